"""Deterministic phantom chest X-rays with known lungs, lesions and shortcut markers.

A phantom data set has the layout of the real one (``manifest.csv``, ``images/``,
``masks/``) plus two manifest columns, ``marker`` and ``marker_kind``, that say which
images carry a burned-in marker. Every image is drawn from parts whose location is known:

* anatomy: trunk with shoulders, spine, clavicles, posterior ribs, heart shadow (on the
  image's right, i.e. the patient's left in the usual PA display), abdomen below the lungs;
* lungs: dark fields shaped by one real v7labs annotation per patient (``trainable.data.lungs``,
  drawn from the first 128 non-empty ones), with a small shift/scale jitter per image; the
  written mask is exactly that shape;
* lesions, only inside the lungs: ``covid`` = bilateral, peripheral, lower-zone ground-glass
  opacities; ``pneumonia`` = one dense lobar consolidation in one lung; ``normal`` = none;
* markers (the shortcut): a bright letter, arrow or text block lying wholly in the outer 8%
  border band, never on the lungs. With ``shortcut=P`` (0 < P <= 1) a share P of the covid
  images and 1 - P of the other images carry one, so P = 0.5 makes markers independent of
  the class and P = 0.9 makes them a strong covid cue; ``shortcut=0`` means no markers.
* body (a shortcut inside the chest, ``confound="anatomy"``): each patient is ``adult`` or
  ``child``-like — a child has a slim trunk: a thin lateral chest wall and narrow shoulders around
  lungs of the same size (body habitus; it lies between the lungs and the border band, so neither
  lung nor edge mass flags it, and a centre crop of ~20% removes it). A share ``confound_rate`` of the covid
  patients are adults and the same share of the others are children, so the minority cells
  (adult non-covid, child covid) break the correlation; ``confound_rate=0.5`` makes the body
  independent of the class (a test set). The lesions stay the true signal. The manifest gets a
  ``body`` column (usable as the sweep's ``group_column``).

The same arguments give byte-identical files: all randomness comes from numpy Generators
seeded by ``(seed, purpose, index)``.

Example
-------
>>> manifest = synthesize(Path("/tmp/phantom"), n_patients=12, size=128)   # doctest: +SKIP
>>> manifest.name                                                            # doctest: +SKIP
'manifest.csv'
"""

from __future__ import annotations

import csv
import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from trainable.atomic import atomic_file
from trainable.data.lungs import load_lung_masks

KNOWN_CLASSES = ("normal", "covid", "pneumonia")
MARKER_KINDS = ("letter", "arrow", "text")
COLUMNS = ("id", "path", "label", "finding", "patient_id", "source", "view", "mask_path",
           "license", "original_name", "marker", "marker_kind")
CONFOUNDS = ("none", "anatomy")
BODIES = ("adult", "child")
BORDER = 0.08                # border band (fraction of the side) that holds every marker
_LUNG_MARGIN = 0.10          # lungs stay this far from each edge, clear of the border band
_TEMPLATE_SIZE = 256         # resolution at which the real annotations are read
_TEMPLATE_POOL = 128         # annotations drawn from: plenty of shapes, ~1/3 of the decode time
_TEXTS = ("PORTABLE", "SUPINE", "AP ERECT", "UPRIGHT", "STAT", "ICU BED")
_LESION_VISIBLE = 0.02       # lesion pixels: added brightness at least this (0-1 scale)


class Rendered(NamedTuple):
    """One phantom image and where its parts are."""

    image: np.ndarray        # uint8 (size, size)
    lung: np.ndarray         # bool (size, size): the true lung mask
    lesion: np.ndarray       # bool (size, size): lesion pixels (a subset of lung)
    marker: np.ndarray       # bool (size, size): marker pixels (inside the border band)


@dataclass(frozen=True)
class _Anatomy:
    """Patient-constant geometry and densities; lung box in fractions of the image side."""

    cx: float
    top: float
    half_width: float
    height: float
    body_pad: float          # trunk half-width / lung-box half-width
    spine_hw: float
    heart_dx: float
    heart_rx: float
    heart_ry: float
    rib_spacing: float
    rib_curve: float
    rib_phase: float
    tissue: float
    lung_depth: float


@dataclass(frozen=True)
class _Patient:
    patient_id: str
    label: str
    finding: str
    sides: np.ndarray        # uint8 template crop: 0 outside, 1 image-left lung, 2 image-right lung
    lesion: np.ndarray       # float32, same shape: lesion opacity in [0, 1]
    anatomy: _Anatomy
    body: str = "adult"


# ---------------------------------------------------------------- argument checks


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r}: must be an int")
    if value < low or (high is not None and value > high):
        rule = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}={value}: must be {rule}")
    return int(value)


def _validate(n_patients: int, size: int, shortcut: float, seed: int,
              images_per_patient: Sequence[int], classes: Sequence[str]) -> None:
    if isinstance(classes, str) or not isinstance(classes, Sequence) or not classes:
        raise ValueError(f"classes={classes!r}: must be a non-empty tuple of class names")
    unknown = [c for c in classes if c not in KNOWN_CLASSES]
    if unknown or len(set(classes)) != len(classes):
        raise ValueError(f"classes={tuple(classes)!r}: must be distinct names from {KNOWN_CLASSES}")
    _check_int("n_patients", n_patients, 2 * len(classes))
    _check_int("size", size, 32, 1024)
    _check_int("seed", seed, 0)
    if isinstance(shortcut, bool) or not isinstance(shortcut, (int, float, np.floating)) \
            or not 0.0 <= float(shortcut) <= 1.0:   # also rejects NaN
        raise ValueError(f"shortcut={shortcut!r}: must be a number in [0, 1]")
    ipp = tuple(images_per_patient) if isinstance(images_per_patient, Sequence) else ()
    if len(ipp) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                            for v in ipp) or not 1 <= ipp[0] <= ipp[1]:
        raise ValueError(f"images_per_patient={images_per_patient!r}: must be two ints (lo, hi) "
                         "with 1 <= lo <= hi")


# ---------------------------------------------------------------- small maths


def _smoothstep(a: float, b: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return n / max(float(n.std()), 1e-6)


def _edge_sigma(size: int) -> float:
    """Blur (px) of the lung border; small so lesions clipped to the mask leave no dark rim."""
    return 0.004 * size


def _resize(a: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of a 2-D array to (height, width), as float32."""
    image = Image.fromarray(a.astype(np.float32))
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))


# ---------------------------------------------------------------- patients


def _two_lung_sides(mask: np.ndarray) -> np.ndarray | None:
    """Crop a real annotation to its box and label its two lungs (1 = image left, 2 = right).

    Returns None for annotations that are not two side-by-side lungs of plausible shape.
    """
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = crop.shape
    if not 0.5 <= h / w <= 1.3:
        return None
    labels, n = ndimage.label(crop)
    if n < 2:
        return None
    areas = np.bincount(labels.ravel())[1:]
    big = np.argsort(areas)[::-1][:2] + 1
    if areas[big - 1].min() < 0.2 * areas.sum() or areas[big - 1].sum() < 0.9 * areas.sum():
        return None
    col = np.arange(w)
    centres = [float((col * (labels == k)).sum() / (labels == k).sum()) for k in big]
    if (centres[0] - w / 2) * (centres[1] - w / 2) >= 0:
        return None   # both big parts on one side: not a left/right pair
    left, right = (big if centres[0] < centres[1] else big[::-1])
    sides = np.zeros((h, w), np.uint8)
    sides[labels == left] = 1
    sides[labels == right] = 2   # fragments beyond the two lungs are dropped
    return sides


def _templates(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Two-lung templates for ``n`` patients, distinct while the pool lasts, then reused."""
    masks = load_lung_masks(_TEMPLATE_SIZE, _TEMPLATE_POOL)
    chosen: list[np.ndarray] = []
    for idx in rng.permutation(len(masks)):
        sides = _two_lung_sides(masks[idx])
        if sides is not None:
            chosen.append(sides)
            if len(chosen) == n:
                return chosen
    if not chosen:
        raise RuntimeError("no usable two-lung annotation among the v7labs masks")
    return [chosen[i % len(chosen)] for i in range(n)]


def _anatomy(rng: np.random.Generator, body: str = "adult") -> _Anatomy:
    u = rng.uniform
    if body == "child":   # a slim trunk: thin chest wall and narrow shoulders around adult-sized lungs
        return _Anatomy(cx=u(0.48, 0.52), top=u(0.13, 0.17), half_width=u(0.29, 0.34),
                        height=u(0.56, 0.64), body_pad=u(1.02, 1.07), spine_hw=u(0.035, 0.045),
                        heart_dx=u(0.04, 0.07), heart_rx=u(0.14, 0.18), heart_ry=u(0.11, 0.14),
                        rib_spacing=u(0.085, 0.10), rib_curve=u(0.35, 0.5), rib_phase=u(0, 1),
                        tissue=u(0.50, 0.60), lung_depth=u(0.32, 0.40))
    return _Anatomy(cx=u(0.48, 0.52), top=u(0.13, 0.17), half_width=u(0.29, 0.34),
                    height=u(0.56, 0.64), body_pad=u(1.18, 1.30), spine_hw=u(0.035, 0.045),
                    heart_dx=u(0.04, 0.07), heart_rx=u(0.14, 0.18), heart_ry=u(0.11, 0.14),
                    rib_spacing=u(0.085, 0.10), rib_curve=u(0.35, 0.5), rib_phase=u(0, 1),
                    tissue=u(0.50, 0.60), lung_depth=u(0.32, 0.40))


def _lung_coords(sides: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels of one lung with lateral (0 medial .. 1 outer) and lower (0 apex .. 1 base) coords."""
    ys, xs = np.nonzero(sides == side)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    span = max(x1 - x0, 1)
    lateral = (x1 - xs) / span if side == 1 else (xs - x0) / span
    lower = (ys - y0) / max(y1 - y0, 1)
    return np.stack([ys, xs]), lateral, lower


def _ggo_field(sides: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Covid: soft blobs in both lungs, drawn towards the outer and lower zones."""
    h, w = sides.shape
    yy, xx = np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32)
    field = np.zeros((h, w), np.float32)
    for side in (1, 2):
        pix, lateral, lower = _lung_coords(sides, side)
        weight = lateral ** 2 * lower ** 2 + 0.01
        picks = rng.choice(pix.shape[1], size=int(rng.integers(3, 6)), p=weight / weight.sum())
        for cy, cx in pix[:, picks].T:
            s = rng.uniform(0.05, 0.09) * w
            gy = np.exp(-0.5 * ((yy - cy) / (s * rng.uniform(1.0, 1.5))) ** 2)
            gx = np.exp(-0.5 * ((xx - cx) / s) ** 2)
            field += rng.uniform(0.6, 1.0) * np.outer(gy, gx)
    return np.clip(field, 0.0, 1.0) * (sides > 0)


def _consolidation_field(sides: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pneumonia: one dense lobe-shaped region in one lung, with an irregular border."""
    h, w = sides.shape
    side = int(rng.integers(1, 3))
    pix, lateral, lower = _lung_coords(sides, side)
    lobe = rng.choice(["lower", "upper", "middle"] if side == 1 else ["lower", "upper"])
    wobble = _smooth_noise(rng, (h, w), 0.06 * w)[pix[0], pix[1]] * 0.08
    if lobe == "lower":
        score, share = lower + 0.25 * (lateral - 0.5), rng.uniform(0.35, 0.5)
    elif lobe == "upper":
        score, share = -lower, rng.uniform(0.3, 0.45)
    else:   # right middle lobe: a mid-lower band next to the heart border
        centre = rng.uniform(0.55, 0.7)
        score, share = -np.abs(lower - centre) - 0.3 * lateral, rng.uniform(0.2, 0.3)
    score = score + wobble
    cut = np.quantile(score, 1.0 - share)
    field = np.zeros((h, w), np.float32)
    field[pix[0], pix[1]] = _sigmoid((score - cut) / 0.02)
    return ndimage.gaussian_filter(field, 0.01 * w) * (sides == side)


def _body_plan(labels: list[str], rate: float, seed: int) -> list[str]:
    """Per patient: ``adult`` for a share ``rate`` of the covid ones, ``child`` for that share of
    the others (exact counts, seeded choice of who)."""
    rng = np.random.default_rng([seed, 4])
    bodies = ["adult"] * len(labels)
    is_covid = np.array([lab == "covid" for lab in labels])
    for group, child_share in ((is_covid, 1.0 - rate), (~is_covid, rate)):
        idx = np.flatnonzero(group)
        for i in rng.permutation(idx)[:round(child_share * len(idx))]:
            bodies[i] = "child"
    return bodies


def _patients(n_patients: int, seed: int, images_per_patient: tuple[int, int],
              classes: Sequence[str], confound_rate: float | None = None
              ) -> tuple[list[_Patient], np.ndarray]:
    """Patients with balanced classes (round-robin, seeded shuffle) and their image counts;
    with ``confound_rate`` their bodies follow `_body_plan`, else every one is an adult."""
    plan = np.random.default_rng([seed, 0])
    labels = [classes[i % len(classes)] for i in range(n_patients)]
    plan.shuffle(labels)
    counts = plan.integers(images_per_patient[0], images_per_patient[1] + 1, size=n_patients)
    templates = _templates(n_patients, plan)
    bodies = _body_plan(labels, confound_rate, seed) if confound_rate is not None else ["adult"] * n_patients
    width = max(3, len(str(n_patients)))
    patients = []
    for j, (label, sides, body) in enumerate(zip(labels, templates, bodies)):
        rng = np.random.default_rng([seed, 1, j])
        patients.append(_make_patient(f"phantom-p{j + 1:0{width}d}", label, sides, rng, body))
    return patients, counts


def _make_patient(patient_id: str, label: str, sides: np.ndarray,
                  rng: np.random.Generator, body: str = "adult") -> _Patient:
    anatomy = _anatomy(rng, body)   # drawn first: one seed gives the same body whatever the label
    finding = label
    if label == "covid":
        lesion = _ggo_field(sides, rng)
    elif label == "pneumonia":
        finding = str(rng.choice(["bacterial", "viral"]))
        lesion = _consolidation_field(sides, rng)
    else:
        lesion = np.zeros(sides.shape, np.float32)
    return _Patient(patient_id, label, finding, sides, lesion.astype(np.float32), anatomy, body)


# ---------------------------------------------------------------- rendering


def _lung_box(a: _Anatomy, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Per-image jitter of the lung box (shift +-2%, scale +-4%), kept off the border band."""
    hw = a.half_width * rng.uniform(0.96, 1.04)
    h = a.height * rng.uniform(0.96, 1.04)
    cx = a.cx + rng.uniform(-0.02, 0.02)
    top = a.top + rng.uniform(-0.02, 0.02) - (h - a.height) / 2
    hw = min(hw, cx - _LUNG_MARGIN, 1 - _LUNG_MARGIN - cx)
    top = max(top, _LUNG_MARGIN)
    return cx, top, hw, min(h, 1 - _LUNG_MARGIN - top)


def _place(p: _Patient, box: tuple[float, float, float, float], size: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """The patient's lungs (bool) and lesion field (float) resized into ``box``."""
    cx, top, hw, h = box
    x0, x1 = math.ceil((cx - hw) * size), math.floor((cx + hw) * size)
    y0, y1 = math.ceil(top * size), math.floor((top + h) * size)
    out = np.zeros((3, size, size), np.float32)
    for k, part in enumerate((p.sides == 1, p.sides == 2, p.lesion)):
        out[k, y0:y1, x0:x1] = _resize(part, x1 - x0, y1 - y0)
    return (out[0] >= 0.5) | (out[1] >= 0.5), out[2]


def _clavicles(Y: np.ndarray, X: np.ndarray, cx: float, top: float, hw: float) -> np.ndarray:
    """Two bright bars from the sternum up and out over the apices (distance to a segment)."""
    out = np.zeros(np.broadcast_shapes(Y.shape, X.shape), np.float32)
    for s in (-1.0, 1.0):
        ax, ay, bx, by = cx + s * 0.04, top + 0.03, cx + s * hw * 1.05, top - 0.035
        dx, dy = bx - ax, by - ay
        t = np.clip(((X - ax) * dx + (Y - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        d = np.hypot(X - ax - t * dx, Y - ay - t * dy)
        out = np.maximum(out, _sigmoid((0.011 - d) / 0.003))
    return out


def _chest(lung: np.ndarray, box: tuple[float, float, float, float], a: _Anatomy,
           rng: np.random.Generator) -> np.ndarray:
    """Chest densities in [0, ~1] (lung texture drawn from ``rng``), before exposure and noise."""
    size = lung.shape[0]
    cx, top, hw, h = box
    bottom = top + h
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    Y, X = c[:, None], c[None, :]
    dxn = np.abs(X - cx)

    # trunk: a neck widening into shoulders, thicker (brighter) along the midline
    body_hw = 0.09 + (hw * a.body_pad - 0.09) * _smoothstep(top - 0.12, top + 0.03, Y)
    body = _sigmoid((body_hw - dxn) / 0.008)
    thickness = np.sqrt(np.clip(1.0 - (dxn / body_hw) ** 2, 0.0, 1.0))
    img = body * a.tissue * (0.55 + 0.45 * thickness)
    img = img + 0.18 * body * _smoothstep(bottom - 0.12, bottom + 0.03, Y)   # liver, abdomen

    # spine with faint vertebral banding, and the clavicles
    vertebrae = 1.0 + 0.15 * np.cos(2 * np.pi * Y / (a.rib_spacing * h * 1.6))
    img = img + 0.2 * body * np.exp(-((X - cx) / a.spine_hw) ** 4) * vertebrae
    img = img + 0.12 * _clavicles(Y, X, cx, top, hw)

    # air in the lungs, with vessel-like texture and brighter hila
    lung_soft = ndimage.gaussian_filter(lung.astype(np.float32), _edge_sigma(size))
    texture = _smooth_noise(rng, (size, size), 0.006 * size)
    hila = sum(np.exp(-(((X - cx - s * 0.4 * hw) / 0.07) ** 2 + ((Y - top - 0.5 * h) / 0.1) ** 2))
               for s in (-1.0, 1.0))
    img = img - a.lung_depth * lung_soft * (1.0 - 0.08 * texture - 0.35 * hila)

    # posterior ribs: arcs rising a little from the spine, then curving down laterally
    d = dxn / hw
    curve = a.rib_curve * h * ((d - 0.3) ** 2 - 0.09)
    phase = (Y - top - curve) / (a.rib_spacing * h) + a.rib_phase
    ribs = ((1.0 + np.cos(2 * np.pi * phase)) / 2) ** 3
    thorax = body * _smoothstep(top - 0.1, top, Y) \
        * (1.0 - _smoothstep(bottom - 0.04, bottom + 0.04, Y))
    img = img + ribs * thorax * (1.0 - _smoothstep(1.0, 1.2, d)) * (0.04 + 0.08 * lung_soft)

    # heart shadow on the image right (the patient's left in a PA view)
    r = np.hypot((X - cx - a.heart_dx) / a.heart_rx, (Y - bottom + 0.22 * h) / a.heart_ry)
    img = img + 0.16 * _sigmoid((1.0 - r) / 0.05) * body
    return img


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exposure, gamma, slight blur and noise; returns uint8."""
    size = img.shape[0]
    img = np.clip(img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05), 0.0, 1.0)
    img = img ** rng.uniform(0.8, 1.25)
    img = ndimage.gaussian_filter(img, rng.uniform(0.3, 0.9) * size / 256)
    img = img + rng.uniform(0.008, 0.025) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=64)
    except (ImportError, OSError, TypeError):   # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


_FONT_LOCK = threading.Lock()   # one FreeType face is shared by the writer threads


@functools.lru_cache(maxsize=64)
def _glyphs(text: str) -> np.ndarray:
    """High-resolution bold rendering of ``text``, cropped to its ink: float32 in [0, 1]."""
    canvas = Image.new("L", (64 * (len(text) + 2), 128), 0)
    with _FONT_LOCK:
        ImageDraw.Draw(canvas).text((16, 16), text, fill=255, font=_font(), stroke_width=4,
                                    stroke_fill=255)
    return np.asarray(canvas.crop(canvas.getbbox()), np.float32) / 255


def _ink(a: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a [0, 1] drawing and binarise it; never empty, even a few pixels tall."""
    small = _resize(a, width, height)
    return small >= min(0.5, 0.5 * float(small.max()))


def _arrow(length: int, thickness: int, rng: np.random.Generator) -> np.ndarray:
    """Bool (thickness, length) arrow pointing left or right."""
    canvas = Image.new("L", (400, 100), 0)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 32, 260, 68), fill=255)
    draw.polygon([(230, 0), (399, 50), (230, 99)], fill=255)
    a = _ink(np.asarray(canvas, np.float32) / 255, length, thickness)
    return a[:, ::-1] if rng.random() < 0.5 else a


def _stamp(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Marker ink, bool (rows, cols), upright; at most ``int(BORDER * size)`` rows tall."""
    band = int(BORDER * size)
    if kind == "arrow":
        t = max(1, round(band * rng.uniform(0.6, 0.85)))
        return _arrow(max(3, round(t * rng.uniform(2.5, 4.0))), t, rng)
    text = str(rng.choice(["L", "R"])) if kind == "letter" else str(rng.choice(_TEXTS))
    g = _glyphs(text)
    tall = rng.uniform(0.7, 0.9) if kind == "letter" else rng.uniform(0.55, 0.75)
    h = max(1, round(band * tall))
    w = max(1, round(g.shape[1] * h / g.shape[0]))
    if w > 0.45 * size:   # long text: shrink to keep it to a corner
        w = int(0.45 * size)
        h = max(1, round(g.shape[0] * w / g.shape[1]))
    return _ink(g, w, h)


def _marker(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Bool (size, size) marker wholly within ``int(BORDER * size)`` pixels of one edge."""
    band = int(BORDER * size)
    ink = _stamp(kind, size, rng)
    # text runs along the top or bottom; an arrow turns to run along a side; a letter stays
    # upright and may stand by a side when it is no wider than the band
    edges = ["top", "bottom"]
    if kind == "arrow" or (kind == "letter" and ink.shape[1] <= band):
        edges += ["left", "right"]
    edge = str(rng.choice(edges))
    if kind == "arrow" and edge in ("left", "right"):
        ink = np.rot90(ink)
    rows, cols = ink.shape
    across = rows if edge in ("top", "bottom") else cols
    along = cols if edge in ("top", "bottom") else rows
    off = int(rng.integers(min(1, band - across), band - across + 1))   # distance from the edge
    room = size - 2 - along
    pos = int(rng.choice([1, room])) if rng.random() < 0.5 else int(rng.integers(1, room + 1))
    out = np.zeros((size, size), bool)
    if edge == "top":
        out[off:off + rows, pos:pos + cols] = ink
    elif edge == "bottom":
        out[size - off - rows:size - off, pos:pos + cols] = ink
    elif edge == "left":
        out[pos:pos + rows, off:off + cols] = ink
    else:
        out[pos:pos + rows, size - off - cols:size - off] = ink
    return out


def _render(p: _Patient, size: int, marker_kind: str | None, rng: np.random.Generator,
            lesion_strength: float = 1.0) -> Rendered:
    """Draw one image of patient ``p``: anatomy, lungs, lesions, exposure, then the marker."""
    # one stream per stage: a lesion or a marker changes nothing else in the image
    geometry, texture, lesion_rng, exposure, stamp = rng.spawn(5)
    box = _lung_box(p.anatomy, geometry)
    lung, field = _place(p, box, size)
    lesion = _lesion(p.label, field, lung, lesion_rng)
    image = _photometric(_chest(lung, box, p.anatomy, texture) + lesion * lesion_strength, exposure)
    marker = np.zeros((size, size), bool)
    if marker_kind is not None:
        marker = _marker(marker_kind, size, stamp) & ~lung   # lungs never reach the band anyway
        image[marker] = int(stamp.integers(235, 256))
    return Rendered(image, lung, (lesion >= _LESION_VISIBLE) & lung, marker)


def _lesion(label: str, field: np.ndarray, lung: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    """Brightness the lesion adds (0-1 scale), zero outside the lungs."""
    size = lung.shape[0]
    if label == "normal":
        return np.zeros((size, size), np.float32)
    # soften the lesion's edge like the lung's, then clip it to the lung
    field = ndimage.gaussian_filter(field * lung, _edge_sigma(size)) * lung
    if label == "covid":   # hazy, patchy ground glass
        patchy = 0.8 + 0.2 * _smooth_noise(rng, (size, size), 0.01 * size)
        return field * patchy * rng.uniform(0.32, 0.42)
    mottle = 0.9 + 0.1 * _smooth_noise(rng, (size, size), 0.008 * size)   # dense consolidation
    return field * mottle * rng.uniform(0.4, 0.5)


def render_example(label: str, size: int = 128, marker_kind: str | None = "letter",
                    seed: int = 0) -> Rendered:
    """Render one image of a fresh patient: the unit ``synthesize`` repeats (for tests, demos)."""
    if label not in KNOWN_CLASSES:
        raise ValueError(f"label={label!r}: must be one of {KNOWN_CLASSES}")
    if marker_kind is not None and marker_kind not in MARKER_KINDS:
        raise ValueError(f"marker_kind={marker_kind!r}: must be None or one of {MARKER_KINDS}")
    _check_int("size", size, 32, 1024)
    sides = _templates(1, np.random.default_rng([seed, 0]))[0]
    patient = _make_patient("phantom-p001", label, sides, np.random.default_rng([seed, 1, 0]))
    return _render(patient, size, marker_kind, np.random.default_rng([seed, 2, 0]))


# ---------------------------------------------------------------- data set


def _marker_plan(labels: list[str], shortcut: float, seed: int) -> list[str | None]:
    """Marker kind (or None) per image: a share ``shortcut`` of covid images, 1 - it of others."""
    rng = np.random.default_rng([seed, 3])
    kinds: list[str | None] = [None] * len(labels)
    if shortcut == 0.0:
        return kinds
    is_covid = np.array([lab == "covid" for lab in labels])
    for group, share in ((is_covid, shortcut), (~is_covid, 1.0 - shortcut)):
        idx = np.flatnonzero(group)
        for i in rng.permutation(idx)[:round(share * len(idx))]:
            kinds[i] = str(rng.choice(MARKER_KINDS))
    return kinds


def _write_png(path: Path, array: np.ndarray) -> None:
    """8-bit grayscale PNG via a temporary file, so no half-written image is left behind."""
    with atomic_file(path) as fh:
        Image.fromarray(array).save(fh, format="PNG", compress_level=1)   # noise barely compresses


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> None:
    with atomic_file(path, text=True, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def synthesize(out: Path, n_patients: int = 60, size: int = 256, shortcut: float = 0.0,
               seed: int = 0, images_per_patient: tuple[int, int] = (2, 4),
               classes: tuple[str, ...] = KNOWN_CLASSES, lesion_strength: float = 1.0,
               confound: str = "none", confound_rate: float = 0.85) -> Path:
    """Write a phantom chest X-ray data set to ``out`` and return its manifest path.

    Parameters
    ----------
    out : Path
        Folder to write ``manifest.csv``, ``images/<id>.png`` and ``masks/<id>.png`` into.
    n_patients : int
        At least ``2 * len(classes)``; classes are balanced across patients.
    size : int
        Image side in pixels, in [32, 1024].
    shortcut : float
        In [0, 1]. 0: no markers at all. Otherwise ``round(shortcut * n)`` of the n covid
        images and ``round((1 - shortcut) * m)`` of the m others carry a marker in the
        border band (0.5: markers independent of the class; 1: covid images only).
    lesion_strength : float
        Multiplies the lesions' brightness (1: default; lower makes the true signal subtler,
        so that a shortcut marker is the easier cue — the setting of the shortcut test).
    confound : str
        ``"none"`` or ``"anatomy"``: adult-like vs child-like bodies correlated with the class
        (see the module doc); adds a ``body`` column to the manifest.
    confound_rate : float
        In [0.5, 1] (``confound="anatomy"`` only): share of covid patients that are adults and of
        the others that are children. 0.85 leaves 15% minority cells; 0.5 makes the body
        independent of the class (a trait-independent test set).
    seed : int
        >= 0; the same arguments give byte-identical files.
    images_per_patient : (int, int)
        Inclusive range of images per patient, ``1 <= lo <= hi``.
    classes : tuple of str
        Distinct names from ``("normal", "covid", "pneumonia")``.
    """
    _validate(n_patients, size, shortcut, seed, images_per_patient, classes)
    if not (isinstance(lesion_strength, (int, float)) and 0 <= lesion_strength <= 3):
        raise ValueError(f"lesion_strength={lesion_strength!r}: must be a number in [0, 3]")
    if confound not in CONFOUNDS:
        raise ValueError(f"confound={confound!r}: must be one of {CONFOUNDS}")
    if isinstance(confound_rate, bool) or not isinstance(confound_rate, (int, float)) \
            or not 0.5 <= confound_rate <= 1.0:
        raise ValueError(f"confound_rate={confound_rate!r}: must be a number in [0.5, 1]")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    patients, counts = _patients(n_patients, seed, tuple(images_per_patient), tuple(classes),
                                 float(confound_rate) if confound == "anatomy" else None)
    owners = np.repeat(np.arange(n_patients), counts)
    kinds = _marker_plan([patients[j].label for j in owners], float(shortcut), seed)
    width = max(4, len(str(len(owners))))

    def write(i: int) -> dict[str, str]:
        p, kind, image_id = patients[owners[i]], kinds[i], f"phantom-{i + 1:0{width}d}"
        r = _render(p, size, kind, np.random.default_rng([seed, 2, i]), lesion_strength)
        _write_png(out / "images" / f"{image_id}.png", r.image)
        _write_png(out / "masks" / f"{image_id}.png", r.lung.astype(np.uint8) * 255)
        return {"id": image_id, "path": f"images/{image_id}.png", "label": p.label,
                "finding": p.finding, "patient_id": p.patient_id, "source": "phantom",
                "view": "PA", "mask_path": f"masks/{image_id}.png",
                "license": "CC0 (synthetic)", "original_name": "",
                "marker": str(int(kind is not None)), "marker_kind": kind or ""} \
            | ({"body": p.body} if confound == "anatomy" else {})

    # each image has its own Generator, so threads (numpy and PNG release the GIL) keep
    # the output byte-identical; map() keeps the rows in id order
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        rows = list(pool.map(write, range(len(owners))))
    manifest = out / "manifest.csv"
    _write_manifest(manifest, rows)   # last: it only ever names images already on disk
    return manifest

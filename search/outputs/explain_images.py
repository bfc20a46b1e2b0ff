"""`cxrtune explain`: Grad-CAM of an exported model on image files — overlay PNG, CAM .npy, JSON line.

The CAM is computed exactly from the loaded module's own feature maps (`model.backbone(x)`) and
head, the same numbers pytorch-grad-cam gives at `meta["target_layer"]` (tests check it).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainable.atomic import atomic_dir  # noqa: E402
from trainable.cam.explain import edge_band, gradcam_from_maps, normalise_and_resize, region_masses  # noqa: E402
from trainable.data.images import mask_geometry, read_gray  # noqa: E402
from trainable.data.lungs import lung_atlas  # noqa: E402
from trainable.errors import DataError  # noqa: E402
from trainable.export import load_model, preprocess_image  # noqa: E402


def explain_images(model_dir: Path, images: list[Path], out: Path, target: str = "predicted",
                   masks: list[Path] | None = None) -> list[dict]:
    """Every input is checked before any work, and the files appear in `out` only once every
    image succeeded: a failed run leaves no empty or partial `out` behind."""
    for kind, path in [("image", i) for i in images] + [("mask", m) for m in masks or []]:
        if not Path(path).is_file():
            raise DataError(f"{kind} {path} does not exist")
    if masks and len(masks) != len(images):
        raise DataError(f"--mask was given {len(masks)} time(s) for {len(images)} image(s): give one per image or none")
    model, meta = load_model(model_dir)
    classes = meta["classes"]
    if target not in ("predicted", *classes):
        raise DataError(f"--target must be 'predicted' or one of the model's classes {classes} (got {target!r})")
    with _staging(Path(out)) as stage:
        lines = [_explain_one(model, meta, Path(image), masks[n] if masks else None, target, stage, Path(out))
                 for n, image in enumerate(images)]
    with open(Path(out) / "explain.jsonl", "a") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return lines


def _explain_one(model: torch.nn.Module, meta: dict, image: Path, mask_file: Path | None, target: str,
                 stage: Path, out: Path) -> dict:
    """Overlay PNG and CAM .npy of one image, written to `stage`; its JSON line names them in `out`."""
    pre, classes = meta["preprocessing"], meta["classes"]
    size, base = pre["input_size"], pre["base_size"]
    edge = edge_band(size, meta.get("edge_band", 0.08))
    gray = read_gray(str(image), base)
    if mask_file is not None:
        mask, mask_source = read_gray(str(mask_file), base) >= 128, "given"
    else:
        mask, mask_source = lung_atlas(base), "atlas"
    lung = mask_geometry(mask[None], pre["crop_margin"], size)
    x = preprocess_image(gray, meta)
    with torch.no_grad():
        maps = model.backbone(x)
        # pool: lungs: the given mask, else the model's own atlas region (what forward(x) uses)
        pooled = model.pool(maps, lung if mask_file is not None else None)
        probs = model.head(pooled).softmax(1)[0].numpy()
    t = int(probs.argmax()) if target == "predicted" else classes.index(target)
    cam = normalise_and_resize(gradcam_from_maps(model.head, maps, torch.tensor([t]), pooled),
                               size)[0].detach().numpy()
    lung_mass, edge_mass = region_masses(cam[None], lung, edge)
    stem = image.stem
    np.save(stage / f"{stem}.cam.npy", cam.astype(np.float32))
    _overlay(stage / f"{stem}.overlay.png", x, pre, cam, lung[0], f"{classes[t]} ({probs[t]:.2f})",
             lung_mass[0], edge_mass[0])
    return {"image": str(image), "predicted": classes[int(probs.argmax())],
            "probabilities": dict(zip(classes, map(float, probs))), "target": classes[t],
            "lung_mass": float(lung_mass[0]), "edge_mass": float(edge_mass[0]), "mask": mask_source,
            "cam": str(out / f"{stem}.cam.npy"), "overlay": str(out / f"{stem}.overlay.png")}


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """Where the files go until every image succeeded. A new `out` appears whole
    (`trainable.atomic.atomic_dir`); into an existing one (other files kept) the files are moved at
    the end. An exception removes the staging directory."""
    if not out.exists():
        with atomic_dir(out) as tmp:
            yield tmp
        return
    tmp = Path(tempfile.mkdtemp(prefix=".explain-", suffix=".tmp", dir=out))
    try:
        yield tmp
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _overlay(path: Path, x: torch.Tensor, pre: dict, cam: np.ndarray, lung: np.ndarray, title: str,
             lung_mass: float, edge_mass: float) -> None:
    gray = (x[0, 0] * pre["std"][0] + pre["mean"][0]).clamp(0, 1).numpy()
    fig, ax = plt.subplots(figsize=(4, 4.3))
    ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
    ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    ax.contour(lung, levels=[0.5], colors="lime", linewidths=1.0)
    ax.set_title(f"{title}\nlung {lung_mass:.2f} · edge {edge_mass:.2f}", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

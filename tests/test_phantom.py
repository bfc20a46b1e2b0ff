"""Phantom data set (trainable.data.phantom) and the real lung annotations it uses (trainable.data.lungs)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from trainable.data import lungs, phantom

SIZE = 64


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read(manifest: Path) -> pd.DataFrame:
    return pd.read_csv(manifest, dtype=str, keep_default_na=False)


def _in_band(mask: np.ndarray) -> bool:
    """Every True pixel lies wholly within 8% of the side from some edge."""
    size = mask.shape[0]
    ys, xs = np.nonzero(mask)
    dist = np.minimum.reduce([ys, xs, size - 1 - ys, size - 1 - xs])
    return bool((dist + 1 <= phantom.BORDER * size).all())


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "a"
    return phantom.synthesize(out, n_patients=12, size=SIZE, shortcut=0.9, seed=1)


# ---------------------------------------------------------------- determinism


def test_same_arguments_give_identical_files(manifest: Path, tmp_path: Path) -> None:
    again = phantom.synthesize(tmp_path / "b", n_patients=12, size=SIZE, shortcut=0.9, seed=1)
    assert _tree(manifest.parent) == _tree(again.parent)


def test_other_seed_gives_other_files(manifest: Path, tmp_path: Path) -> None:
    other = phantom.synthesize(tmp_path / "c", n_patients=12, size=SIZE, shortcut=0.9, seed=2)
    first = "images/phantom-0001.png"
    assert (other.parent / first).read_bytes() != (manifest.parent / first).read_bytes()
    assert other.read_bytes() != manifest.read_bytes()


# ---------------------------------------------------------------- manifest and files


def test_manifest_columns_and_fixed_fields(manifest: Path) -> None:
    table = _read(manifest)
    assert tuple(table.columns) == phantom.COLUMNS
    assert list(table.id) == sorted(table.id) and table.id.is_unique
    assert set(table.source) == {"phantom"} and set(table.view) == {"PA"}
    assert set(table.license) == {"CC0 (synthetic)"} and set(table.original_name) == {""}
    assert table.id.str.fullmatch(r"phantom-\d{4}").all()
    assert table.patient_id.str.fullmatch(r"phantom-p\d{3}").all()
    assert set(table.marker) <= {"0", "1"}
    assert ((table.marker == "1") == table.marker_kind.isin(phantom.MARKER_KINDS)).all()
    assert (table.marker_kind[table.marker == "0"] == "").all()
    pneumonia = table.label == "pneumonia"
    assert (table.finding[~pneumonia] == table.label[~pneumonia]).all()
    assert set(table.finding[pneumonia]) <= {"bacterial", "viral"}


def test_every_path_exists_with_matching_sizes(manifest: Path) -> None:
    root = manifest.parent
    for row in _read(manifest).itertuples():
        image, mask = Image.open(root / row.path), Image.open(root / row.mask_path)
        assert image.mode == "L" and mask.mode == "L"
        assert image.size == mask.size == (SIZE, SIZE)
        values = np.unique(np.asarray(mask))
        assert set(values.tolist()) == {0, 255}
    assert not [p for p in root.rglob(".*")], "temporary files left behind"


def test_patients_have_one_label_and_classes_are_balanced(manifest: Path) -> None:
    table = _read(manifest)
    per_patient = table.groupby("patient_id").label.nunique()
    assert (per_patient == 1).all()
    patients = table.drop_duplicates("patient_id").label.value_counts()
    assert set(patients.index) == set(phantom.KNOWN_CLASSES)
    assert patients.max() - patients.min() <= 1
    images = table.groupby("patient_id").size()
    assert images.between(2, 4).all() and len(images) == 12


def test_class_subset(tmp_path: Path) -> None:
    m = phantom.synthesize(tmp_path, n_patients=4, size=32, classes=("normal", "covid"),
                           images_per_patient=(1, 1))
    table = _read(m)
    assert len(table) == 4 and table.label.value_counts().to_dict() == {"normal": 2, "covid": 2}


# ---------------------------------------------------------------- shortcut markers


def _marker_share(tmp_path: Path, shortcut: float) -> pd.Series:
    m = phantom.synthesize(tmp_path / str(shortcut), n_patients=60, size=32, shortcut=shortcut,
                           seed=3, images_per_patient=(2, 2))
    table = _read(m)
    return (table.marker == "1").groupby(table.label == "covid").mean()


def test_shortcut_marks_mostly_covid(tmp_path: Path) -> None:
    share = _marker_share(tmp_path, 0.9)
    assert 0.8 <= share[True] <= 1.0
    assert 0.0 < share[False] <= 0.2


def test_half_shortcut_is_class_independent(tmp_path: Path) -> None:
    share = _marker_share(tmp_path, 0.5)
    assert abs(share[True] - 0.5) <= 0.1 and abs(share[False] - 0.5) <= 0.1


def test_zero_shortcut_means_no_markers(tmp_path: Path) -> None:
    share = _marker_share(tmp_path, 0.0)
    assert share[True] == share[False] == 0.0


# ---------------------------------------------------------------- one rendered image


@pytest.mark.parametrize("kind", phantom.MARKER_KINDS)
@pytest.mark.parametrize("label", phantom.KNOWN_CLASSES)
def test_parts_stay_in_their_regions(label: str, kind: str) -> None:
    for seed in range(3):
        r = phantom.render_example(label, size=96, marker_kind=kind, seed=seed)
        assert r.image.dtype == np.uint8 and r.image.shape == (96, 96)
        assert not (r.lesion & ~r.lung).any(), "lesion outside the lungs"
        assert r.lesion.any() == (label != "normal")
        assert r.marker.any() and _in_band(r.marker)
        assert not (r.marker & ndimage.binary_dilation(r.lung)).any(), "marker touches a lung"
        assert r.image[r.marker].min() >= 235, "marker is not bright"


def test_lesions_are_visible_and_only_in_the_lungs() -> None:
    # same seed: same patient body and exposure, so the difference is the lesion alone
    for seed in range(3):
        normal = phantom.render_example("normal", 224, None, seed)
        for label in ("covid", "pneumonia"):
            sick = phantom.render_example(label, 224, None, seed)
            diff = sick.image.astype(int) - normal.image.astype(int)
            assert diff[sick.lesion].mean() >= 10
            away = ~ndimage.binary_dilation(sick.lung, iterations=3)
            assert np.abs(diff[away]).max() <= 1


def test_covid_is_bilateral_and_lower_pneumonia_is_one_lung() -> None:
    for seed in range(4):
        covid = phantom.render_example("covid", 128, None, seed)
        labels, n = ndimage.label(covid.lung)
        big = np.argsort(np.bincount(labels.ravel())[1:])[::-1][:2] + 1
        assert all((covid.lesion & (labels == k)).any() for k in big)
        rows = np.arange(128)[:, None]
        assert (rows * covid.lesion).sum() / covid.lesion.sum() > \
            (rows * covid.lung).sum() / covid.lung.sum()
        pneumonia = phantom.render_example("pneumonia", 128, None, seed)
        cols = np.nonzero(pneumonia.lesion)[1]
        centre = np.nonzero(pneumonia.lung)[1].mean()
        assert (cols < centre).all() or (cols > centre).all()


def test_marker_fits_the_band_at_the_smallest_size() -> None:
    for kind in phantom.MARKER_KINDS:
        r = phantom.render_example("normal", size=32, marker_kind=kind, seed=0)
        assert r.marker.any() and _in_band(r.marker) and not (r.marker & r.lung).any()


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize("kwargs, name", [
    ({"n_patients": 5}, "n_patients"),
    ({"n_patients": 1, "classes": ("normal",)}, "n_patients"),
    ({"size": 16}, "size"),
    ({"size": 2048}, "size"),
    ({"size": 64.0}, "size"),
    ({"shortcut": -0.1}, "shortcut"),
    ({"shortcut": 1.5}, "shortcut"),
    ({"shortcut": math.nan}, "shortcut"),
    ({"seed": -1}, "seed"),
    ({"images_per_patient": (0, 2)}, "images_per_patient"),
    ({"images_per_patient": (3, 2)}, "images_per_patient"),
    ({"images_per_patient": (2,)}, "images_per_patient"),
    ({"classes": ("normal", "flu")}, "classes"),
    ({"classes": ("covid", "covid")}, "classes"),
    ({"classes": ()}, "classes"),
])
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}="):
        phantom.synthesize(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists(), "nothing is written before the checks pass"


# ---------------------------------------------------------------- real lung annotations


def test_real_lung_masks() -> None:
    masks = lungs.load_lung_masks(64)
    assert masks.dtype == bool and masks.shape[1:] == (64, 64) and len(masks) >= 400
    share = masks.mean(axis=(1, 2))
    # a handful of annotations are tight crops or small figures: allow 1% outside [0.1, 0.6]
    assert share.min() > 0.05 and share.max() < 0.7
    assert ((share >= 0.1) & (share <= 0.6)).mean() >= 0.99
    assert lungs.load_lung_masks(64) is masks, "cached in-process"
    assert not masks.flags.writeable
    assert len(lungs.load_lung_masks(64, limit=5)) == 5


def test_atlas_is_cached_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    atlas = lungs.lung_atlas(64, cache_dir=tmp_path)
    assert atlas.dtype == bool and atlas.shape == (64, 64)
    assert 0.2 < atlas.mean() < 0.5
    assert atlas[:, :32].any() and atlas[:, 32:].any() and not atlas[:5].any()
    assert len(list(tmp_path.glob("*.npy"))) == 2   # probability map and thresholded atlas

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second call must read the cache file")

    monkeypatch.setattr(lungs, "load_lung_masks", no_decoding)
    assert np.array_equal(lungs.lung_atlas(64, cache_dir=tmp_path), atlas)
    prob = lungs.lung_atlas_probability(64, cache_dir=tmp_path)
    assert prob.dtype == np.float32 and np.array_equal(prob >= 0.5, atlas)


def test_lungs_argument_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^size=4"):
        lungs.load_lung_masks(4)
    with pytest.raises(ValueError, match=r"^limit=0"):
        lungs.load_lung_masks(64, limit=0)
    with pytest.raises(ValueError, match=r"^threshold=0"):
        lungs.lung_atlas(64, threshold=0, cache_dir=tmp_path)


def test_missing_zip_names_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert lungs.v7labs_zip_path().name == "semantic_masks_v7labs_lungs.zip"
    fake = SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(lungs.importlib.util, "find_spec", lambda name: fake)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        lungs.v7labs_zip_path()

"""The on-disk caches (trainable.cache): corrupt entries are rebuilt, never used; keys follow the
content; concurrent builders of one entry build it once; prepare reads what it wrote."""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainable.cache import (
    CACHE_ENV,
    DiskCache,
    FeatureStore,
    array_digest,
    cache_root,
    cached_features,
    decoded_images,
)
from trainable.data.dataset import load_dataset
from trainable.models.featureset import FeatureKey
from trainable.prepare import prepare_local
from trainable.shared import Settings

from conftest import write_manifest_dataset


def _builder(calls: list[int], value: int = 7):
    def build():
        calls.append(1)
        return {"a": np.full((4, 5), value, np.int16), "b": np.arange(10, dtype=np.float32)}, {"v": value}
    return build


def _corrupt_data_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # the last byte is array data, after the .npy header
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["flip a data byte", "truncate an array", "garbage meta.json",
                                    "delete an array", "wrong shape"])
def test_corrupt_entry_is_detected_rebuilt_and_never_used(tmp_path: Path, damage: str) -> None:
    messages: list[str] = []
    cache = DiskCache(tmp_path, "demo", log=messages.append)
    calls: list[int] = []
    first = cache.get_or_create({"x": 1}, _builder(calls))
    assert not first.hit and calls == [1]
    entry = cache.path({"x": 1})
    if damage == "flip a data byte":
        _corrupt_data_byte(entry / "a.npy")
    elif damage == "truncate an array":
        (entry / "b.npy").write_bytes((entry / "b.npy").read_bytes()[:100])
    elif damage == "garbage meta.json":
        (entry / "meta.json").write_text("{not json")
    elif damage == "delete an array":
        (entry / "a.npy").unlink()
    else:
        np.save(entry / "a.npy", np.full((5, 4), 7, np.int16))
    again = cache.get_or_create({"x": 1}, _builder(calls))
    assert not again.hit and calls == [1, 1], "a corrupt entry must be rebuilt"
    assert any("corrupt" in m and str(entry) in m for m in messages), messages
    np.testing.assert_array_equal(again.arrays["a"], np.full((4, 5), 7, np.int16))
    third = cache.get_or_create({"x": 1}, _builder(calls))
    assert third.hit and calls == [1, 1] and third.digests == again.digests


def test_entries_round_trip_exactly_and_off_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    cache = DiskCache(tmp_path, "demo", log=lambda m: None)
    built = cache.get_or_create({"x": 2}, _builder([]))
    read = cache.get_or_create({"x": 2}, lambda: 1 / 0)  # a hit never builds
    assert read.hit and read.info == {"v": 7}
    for name, a in built.arrays.items():
        assert read.arrays[name].dtype == a.dtype
        np.testing.assert_array_equal(read.arrays[name], a)
        assert read.digests[name] == array_digest(a)
    assert not list(tmp_path.glob("demo/.tmp-*")), "no temporary directory is left behind"

    monkeypatch.setenv(CACHE_ENV, "off")
    assert cache_root() is None and cache_root("off") is None
    off = DiskCache(cache_root(), "demo").get_or_create({"x": 2}, _builder(calls := []))
    assert not off.hit and off.path is None and calls == [1]
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "from-env"))
    assert cache_root() == (tmp_path / "from-env").resolve()
    assert cache_root(str(tmp_path / "explicit")) == (tmp_path / "explicit").resolve()  # Settings wins
    monkeypatch.delenv(CACHE_ENV)
    assert cache_root() == Path("~/.cache/cxrtune").expanduser().resolve()


def test_image_cache_key_follows_content_and_base_size(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    ds = load_dataset(write_manifest_dataset(tmp_path / "data"), "labels")
    first = decoded_images(ds, 32, root, log=lambda m: None)
    again = decoded_images(load_dataset(ds.root, "labels"), 32, root, log=lambda m: None)
    assert not first.hit and again.hit and again.digest == first.digest and again.path == first.path
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.masks, first.masks)
    assert first.masks.any() and first.masks.dtype == bool

    other_size = decoded_images(ds, 24, root, log=lambda m: None)
    assert not other_size.hit and other_size.path != first.path

    # change one image's pixels: a new entry with other contents; the old one is not read
    img = Path(ds.table["path"][0])
    time.sleep(0.01)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(img)
    changed = decoded_images(load_dataset(ds.root, "labels"), 32, root, log=lambda m: None)
    assert not changed.hit and changed.path != first.path and changed.digest != first.digest
    assert (changed.images[0] == 0).all()


def test_feature_key_follows_everything_features_depend_on() -> None:
    key = FeatureKey("efficientnet_lite0", "imagenet", 0.08, 64)
    store = FeatureStore(Path("/unused"), "images-digest-1")
    cache = DiskCache(Path("/unused"), "features")

    def address(store=store, key=key, views=None, seed=0, sha="w1", device="cpu-fp32"):
        return cache.key(store.description(key, views or {"none": 4, "light": 3}, seed, sha, device))

    base = address()
    assert address(views={"light": 3, "none": 9}) == base, "order and 'none' view count do not matter"
    changed = [address(views={"none": 4, "light": 2}), address(views={"none": 4}), address(seed=1),
               address(sha="w2"), address(device="cuda-fp16-autocast"),
               address(store=FeatureStore(Path("/unused"), "images-digest-2")),
               address(key=dataclasses.replace(key, crop_margin=0.0)),
               address(key=dataclasses.replace(key, input_size=96)),
               address(key=dataclasses.replace(key, backbone="efficientnet_lite1"))]
    assert len({base, *changed}) == len(changed) + 1


def _worker(root: str, counter: str, queue) -> None:
    def build():
        with open(counter, "a") as f:  # one line per build
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # the others arrive while this one builds
        return {"a": np.arange(1000, dtype=np.float64)}, {}
    e = DiskCache(root, "demo", log=lambda m: None).get_or_create({"shared": True}, build)
    queue.put((e.hit, e.digests["a"]))


def test_concurrent_builders_of_one_entry_build_it_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    counter = tmp_path / "builds.txt"
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "cache"), str(counter), queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(counter.read_text().splitlines()) == 1, "the entry must be built exactly once"
    assert sorted(hit for hit, _ in results) == [False, True, True, True]
    assert len({digest for _, digest in results}) == 1


def test_prepare_reads_its_caches_and_rebuilds_a_corrupt_feature_entry(tmp_path: Path) -> None:
    ds = load_dataset(write_manifest_dataset(tmp_path / "data", size=64), "labels")
    settings = Settings(folds=2, base_size=64, input_size=64, views=2, cache_dir=str(tmp_path / "cache"))
    key = FeatureKey("efficientnet_lite0", "imagenet", 0.0, 64)
    lines: list[str] = []
    cold = prepare_local(ds, settings, [key], ["none", "light"], progress=lines.append)
    warm = prepare_local(ds, settings, [key], ["none", "light"], progress=lines.append)
    assert cold.timings["decode_cache_hit"] == 0 and cold.timings["feature_cache_hits"] == 0
    assert warm.timings["decode_cache_hit"] == 1 and warm.timings["feature_cache_hits"] == 1
    a, b = cold.feature_set(key), warm.feature_set(key)
    assert b.extra["cache"] == "hit" and b.images_through_backbone == 0 and a.images_through_backbone == 2 * len(ds)
    assert a.maps.dtype == b.maps.dtype == np.float16
    np.testing.assert_array_equal(a.maps, b.maps)
    assert a.pooled.keys() == b.pooled.keys()
    for p in a.pooled:
        np.testing.assert_array_equal(a.pooled[p], b.pooled[p])
    assert (a.preprocessing, a.target_layer, a.weights_info) == (b.preprocessing, b.target_layer, b.weights_info)

    _corrupt_data_byte(Path(b.extra["cache_path"]) / "maps.npy")
    lines.clear()
    rebuilt = prepare_local(ds, settings, [key], ["none", "light"], progress=lines.append)
    assert rebuilt.timings["feature_cache_hits"] == 0 and any("corrupt" in m for m in lines), lines
    np.testing.assert_array_equal(rebuilt.feature_set(key).maps, a.maps)
    # the driver-side probe (prepare_sweep's) sees the rebuilt entry without computing anything
    root = Path(settings.cache_dir).resolve()
    store = FeatureStore(root, decoded_images(ds, 64, root, log=lambda m: None).digest)
    probe = cached_features(None, key, {"none": 2, "light": 2}, settings.seed, store, compute=False)
    assert probe is not None and probe.extra["cache"] == "hit"
    np.testing.assert_array_equal(probe.maps, a.maps)


def test_the_data_hash_follows_content_not_size_and_time(tmp_path: Path) -> None:
    """An image rewritten with other pixels but the same size and modification time is other data:
    the decoded-image cache (keyed on this hash) must not serve the old pixels."""
    from conftest import write_manifest_dataset

    root = write_manifest_dataset(tmp_path / "d", n_patients=4, per_patient=1)
    ds = load_dataset(root, "labels")
    before = ds.content_hash()
    image = root / "images" / "0.png"
    st = image.stat()
    data = bytearray(image.read_bytes())
    data[-20] ^= 0xFF  # same length, other bytes
    image.write_bytes(bytes(data))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert image.stat().st_size == st.st_size and image.stat().st_mtime_ns == st.st_mtime_ns
    assert load_dataset(root, "labels").content_hash() != before

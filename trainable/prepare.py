"""Entry point 1 of 3 for the driver: turn a data set and the sweep's fixed settings into what
every trial shares — decoded labels, the folds, lung masks per crop, and feature sets (one per
(backbone, weights, crop, input size)) computed once — on warm Ray actors, or by the driver's
threads when the cluster is this one machine — and kept in the object store.

Decoded images and feature sets are also kept on disk (`trainable.cache`, content-addressed), so a
later sweep over the same data reads them instead of decoding and running the backbones again.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import numpy as np
import ray
import torch

from trainable.cache import FeatureStore, cache_root, cached_features, decoded_images
from trainable.cam.lung_segment import choose_lung_masks
from trainable.data.dataset import Dataset
from trainable.data.duplicates import fold_groups
from trainable.data.folds import patient_folds
from trainable.data.images import mask_geometry
from trainable.data.lungs import lung_atlas
from trainable.errors import DataError
from trainable.models.featureset import FeatureKey, FeatureSet
from trainable.shared import Prepared, Settings


def _feature_task(images: np.ndarray, key: FeatureKey, views: dict[str, int], seed: int,
                  store: FeatureStore | None = None, masks: np.ndarray | None = None) -> tuple[dict, FeatureSet]:
    notes: list[str] = []  # the cache's messages (a corrupt entry rebuilt), shown by the driver
    fs = cached_features(images, key, views, seed, store, log=notes.append, masks=masks)
    return _summary(key, fs) | {"notes": notes}, fs


def _summary(key: FeatureKey, fs: FeatureSet) -> dict:
    return {"key": str(key), "images": fs.images_through_backbone, "seconds": fs.seconds,
            "maps": tuple(fs.maps.shape[1:]), "weights": fs.weights_info.get("source"),
            "cache": fs.extra.get("cache", "off")}


def _feature_line(s: dict) -> str:
    notes = "".join(f"  {n}\n" for n in s.get("notes", ()))
    if s["cache"] == "hit":
        return notes + f"  features {s['key']}: read from the disk cache in {s['seconds']:.1f}s, maps {s['maps']}"
    return notes + (f"  features {s['key']}: {s['images']} images in {s['seconds']:.1f}s "
                    f"({s['images'] / max(s['seconds'], 1e-9):.0f} img/s), maps {s['maps']}, "
                    f"weights {s['weights']}")


class SharedArrays(NamedTuple):
    """What every trial shares except the features: decoded images, their feature store, and the
    fields of `Prepared` (labels, folds, lung masks per crop, groups, timings)."""

    images: np.ndarray
    store: FeatureStore
    fields: dict
    masks: np.ndarray | None = None   # bool (N, S, S) base-size lung masks, kept only for `pool: lungs` keys


def shared_arrays(dataset: Dataset, settings: Settings, keys: Iterable[FeatureKey],
                  progress: Callable[[str], None] = print) -> SharedArrays:
    """Decode once (or read the image cache), split once, lung masks per crop: all but the features.
    No Ray: the driver runs it before Ray starts, so a file that cannot be decoded stops a sweep
    before any cluster work (a DataError naming the file)."""
    keys = sorted(set(keys), key=str)
    folds = patient_folds(dataset.labels, fold_groups(dataset), dataset.classes, settings.folds, settings.seed)
    t0 = time.perf_counter()
    root = cache_root(settings.cache_dir)
    decoded = decoded_images(dataset, settings.base_size, root, progress)
    images, masks = decoded.images, decoded.masks
    t_decode = time.perf_counter() - t0
    # the lung-mask source (settings.lung_masks: auto | data | atlas | pspnet; trainable.cam.lung_segment)
    ids = dataset.table["id"].tolist()
    masks, mask_source = choose_lung_masks(
        settings.lung_masks, images, masks, dataset.has_masks, ids, decoded.digest, root,
        lambda: lung_atlas(settings.base_size, settings.atlas_threshold), progress)
    sources = ", ".join(f"{n} {s}" for s, n in zip(*np.unique(mask_source, return_counts=True)))
    progress(f"{'read from the image cache' if decoded.hit else 'decoded'}: {len(images)} images at "
             f"{settings.base_size}px in {t_decode:.1f}s (lung masks {settings.lung_masks}: {sources})")
    lung = {m: mask_geometry(masks, m, settings.input_size) for m in sorted({k.crop_margin for k in keys})}
    fields = dict(settings=settings, classes=dataset.classes, labels=dataset.labels,
                  ids=ids, paths=dataset.table["path"].tolist(), folds=folds,
                  lung_masks=lung, mask_source=mask_source,
                  base_masks=np.packbits(np.asarray(masks, bool), axis=-1),  # 1 bit a pixel
                  groups=group_values(dataset, settings.group_column),
                  patients=fold_groups(dataset),  # duplicates merged: the inner split keeps pairs together
                  data_hash=dataset.content_hash())
    timings = {"decode_s": t_decode, "decode_cache_hit": float(decoded.hit)}
    lung_pooled = any(k.pool == "lungs" for k in keys)  # their feature pass warps the masks with each view
    return SharedArrays(images, FeatureStore(root, decoded.digest), fields | {"timings": timings},
                        masks if lung_pooled else None)


def group_values(dataset: Dataset, column: str) -> np.ndarray:
    """The grouping column as strings; images without a value form the group "unknown"."""
    if column not in dataset.table:
        raise DataError(f"group_column {column!r} is not a column of the data "
                        f"(columns: {', '.join(map(str, dataset.table.columns))})")
    values = dataset.table[column].astype(str).replace({"": "unknown", "nan": "unknown"})
    return values.to_numpy()


def prepare_local(dataset: Dataset, settings: Settings, keys: Iterable[FeatureKey],
                  augment_policies: Iterable[str], progress: Callable[[str], None] = print) -> Prepared:
    """The same as `prepare_sweep`, computed in this process (no Ray): for select/export after a sweep."""
    keys = sorted(set(keys), key=str)
    images, store, fields, masks = shared_arrays(dataset, settings, keys, progress)
    views = {p: settings.views for p in sorted(set(augment_policies))}
    features = {}
    for k in keys:
        summary, features[str(k)] = _feature_task(images, k, views, settings.seed, store,
                                                  masks if k.pool == "lungs" else None)
        progress(_feature_line(summary))
    fields["timings"]["feature_cache_hits"] = float(sum(fs.extra.get("cache") == "hit" for fs in features.values()))
    return Prepared(features=features, images=images, **fields)


class FeatureWorker:
    """A warm feature worker (a Ray actor): it imports the backbone stack when it starts, while the
    driver decodes the images, then computes every key it is given, building each backbone once.

    One task per key paid a new worker process, its imports (torch, timm, torchvision: several
    seconds) and a backbone build per key; a few workers fed keys pay them once per sweep."""

    def __init__(self) -> None:
        import timm  # noqa: F401 - imported now, in parallel with the driver's decoding

        from trainable.models import features  # noqa: F401

    def compute(self, images: np.ndarray, key: FeatureKey, views: dict[str, int], seed: int,
                store: FeatureStore | None, masks: np.ndarray | None = None) -> tuple[dict, FeatureSet]:
        return _feature_task(images, key, views, seed, store, masks)


def _worker_count(n_keys: int, cpus: float, gpus: float) -> int:
    """As many workers as keys, up to what the cluster runs at once."""
    res = ray.cluster_resources()
    fit = int(res.get("CPU", 1) // max(cpus, 1e-9))
    if gpus > 0:
        fit = min(fit, int(res.get("GPU", 0) // gpus))
    return max(1, min(n_keys, fit))


def _by_backbone(keys: list[FeatureKey], n_workers: int) -> list[list[FeatureKey]]:
    """Keys dealt to workers so that one backbone's keys (its crops) share a worker and its build."""
    groups: dict[tuple[str, str], list[FeatureKey]] = {}
    for k in keys:
        groups.setdefault((k.backbone, k.weights), []).append(k)
    queues: list[list[FeatureKey]] = [[] for _ in range(n_workers)]
    for group in sorted(groups.values(), key=len, reverse=True):
        min(queues, key=len).extend(group)
    return queues


def prepare_sweep(dataset: Dataset, settings: Settings, keys: Iterable[FeatureKey],
                  augment_policies: Iterable[str], *, cpus: float = 1, gpus: float = 0,
                  progress: Callable[[str], None] = print, shared: SharedArrays | None = None,
                  in_driver: bool | None = None) -> Prepared:
    """Decode once (`shared`: already decoded by `shared_arrays`), split once, compute the features
    of every key once, into the object store.

    Where the features are computed: on warm workers (`FeatureWorker` actors), or — on a cluster
    that is one node with this driver on it and no GPU asked for (`in_driver` None: decided here) —
    in this process, one thread per CPU (`_InDriver`): the driver has torch imported already,
    while a worker process pays ~3 s of imports before its first image and the trial actors that
    follow cannot reuse it."""
    keys = sorted(set(keys), key=str)
    if in_driver is None:
        in_driver = gpus == 0 and _driver_is_the_cluster()
    if in_driver:
        return _prepare_with(_InDriver(ray.cluster_resources().get("CPU", 1)), dataset, settings, keys,
                             augment_policies, progress, shared)
    actor = ray.remote(num_cpus=cpus, num_gpus=gpus)(FeatureWorker)
    workers = [actor.remote() for _ in range(_worker_count(len(keys), cpus, gpus))]  # start importing now
    try:
        return _prepare_with(_OnWorkers(workers), dataset, settings, keys, augment_policies, progress, shared)
    finally:
        for w in workers:  # their CPUs go to the trials; the feature sets stay in the object store
            ray.kill(w)


def _driver_is_the_cluster() -> bool:
    """One live node, and it is the one this process runs on (a local cluster, or `ray start` here)."""
    nodes = [n for n in ray.nodes() if n.get("Alive", True)]
    return len(nodes) == 1 and nodes[0].get("NodeID") == ray.get_runtime_context().get_node_id()


class _OnWorkers:
    """Computes the missing keys on `FeatureWorker` actors, one backbone's keys on one worker."""

    def __init__(self, workers: list) -> None:
        self.workers = workers

    def where(self, n_keys: int) -> str:
        return f"on {min(len(self.workers), n_keys)} worker(s)"

    def __call__(self, keys: list[FeatureKey], images: np.ndarray, images_ref, views: dict[str, int], seed: int,
                 store: FeatureStore, masks: np.ndarray | None) -> Iterator[tuple[str, dict, object]]:
        """(str(key), summary, FeatureSet ref) of every key, in the order they finish."""
        lung_keys = any(k.pool == "lungs" for k in keys)
        masks_ref = ray.put(masks) if lung_keys and masks is not None else None  # read by the actors, zero-copy
        pending = {}
        for worker, q in zip(self.workers, _by_backbone(keys, len(self.workers))):
            for k in q:  # an actor runs its calls one after another
                summary, features = worker.compute.options(num_returns=2).remote(
                    images_ref, k, views, seed, store, masks_ref if k.pool == "lungs" else None)
                pending[summary] = (str(k), features)
        summaries = list(pending)
        while summaries:
            done, summaries = ray.wait(summaries, num_returns=1)
            key, features = pending[done[0]]
            yield key, ray.get(done[0]), features  # the small summary only: the arrays stay in the object store


class _InDriver:
    """Computes the missing keys in this process: one thread per CPU (torch's ops release the GIL),
    each with one intra-op thread, taking the next key when it is done with one (a backbone is built
    once per process, so dealing keys by backbone saves nothing here, and a fixed deal left a core
    idle while the slower backbone's thread finished), and puts each set in the object store."""

    def __init__(self, cpus: float) -> None:
        self.cpus = max(1, int(cpus))

    def where(self, n_keys: int) -> str:
        return f"in the driver ({min(n_keys, self.cpus)} thread(s))"

    def __call__(self, keys: list[FeatureKey], images: np.ndarray, images_ref, views: dict[str, int], seed: int,
                 store: FeatureStore, masks: np.ndarray | None) -> Iterator[tuple[str, dict, object]]:
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for k in keys:
            todo.put(k)
        done: queue.SimpleQueue = queue.SimpleQueue()
        failed = threading.Event()  # after a failure the other threads start no further key

        def run() -> None:
            while not failed.is_set():
                try:
                    k = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    summary, fs = _feature_task(images, k, views, seed, store, masks if k.pool == "lungs" else None)
                    done.put((str(k), summary, ray.put(fs)))
                except BaseException as e:  # noqa: BLE001 - raised again in the driver's thread
                    failed.set()
                    done.put(e)
                    return

        n_threads = min(len(keys), self.cpus)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(max(1, self.cpus // n_threads))
        threads = [threading.Thread(target=run, daemon=True) for _ in range(n_threads)]
        try:
            for t in threads:
                t.start()
            for _ in keys:
                item = done.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            failed.set()  # a failure or Ctrl-C here: the threads finish their current key only
            for t in threads:
                t.join()
            torch.set_num_threads(threads_before)


def _prepare_with(compute: _OnWorkers | _InDriver, dataset: Dataset, settings: Settings, keys: list[FeatureKey],
                  augment_policies: Iterable[str], progress: Callable[[str], None],
                  shared: SharedArrays | None) -> Prepared:
    images, store, fields, masks = shared or shared_arrays(dataset, settings, keys, progress)
    views = {p: settings.views for p in sorted(set(augment_policies))}
    images_ref = ray.put(images)  # once per sweep: feature actors and full-path trials read it zero-copy
    refs: dict[str, object] = {}
    hits, t1, missing = 0, time.perf_counter(), []
    for k in keys:
        cached = cached_features(None, k, views, settings.seed, store, progress, compute=False,
                                 masks=masks if k.pool == "lungs" else None)
        if cached is not None:  # on disk already: no backbone
            refs[str(k)] = ray.put(cached)
            progress(_feature_line(_summary(k, cached)))
            hits += 1
        else:
            missing.append(k)
    if missing:
        progress(f"computing frozen-backbone features for {len(missing)} key(s) {compute.where(len(missing))} "
                 f"({len(views)} augmentation policies, {settings.views} views each)")
        for key, s, features in compute(missing, images, images_ref, views, settings.seed, store, masks):
            refs[key] = features
            hits += s["cache"] == "hit"
            progress(_feature_line(s))
    fields["timings"]["features_s"] = time.perf_counter() - t1
    fields["timings"]["feature_cache_hits"] = float(hits)
    return Prepared(features=refs, images=images_ref, **fields)

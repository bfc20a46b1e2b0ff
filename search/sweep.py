"""Run a sweep: space file + data → Ray Tune (OptunaSearch + ASHA) → results directory; resume one.

The driver validates everything first (space, data, folds, weights), then prepares the shared
arrays once (`trainable.prepare`), then hands `trainable.trial.run_trial` to a Tuner.
`resume_sweep` rebuilds the same trainable from the results directory (`search.rundir`) and
restores the Tuner (`search.durable`: where the experiment lives, SIGTERM).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from itertools import product
from pathlib import Path
from typing import Callable

import ray
from ray import tune

from search.callbacks.live import LiveTrials
from search.callbacks.progress import ProgressLine
from search.callbacks.trackers import tracker_callbacks
from search.durable import (
    STORAGE_ENV,
    SweepInterrupted,
    check_storage,
    experiment_path,
    graceful_stop,
    is_uri,
    mirror_checkpoints,
    publish_results,
    tune_location,
)
from search.objective import check_metric_defined, make_score
from search.outputs.heldout import check_split, score_heldout, search_split, write_split
from search.outputs.results import write_results
from search.outputs.select import export_selection
from search.report.html import cluster_hardware, write_report
from search.rundir import (SweepError, check_folds, holds_sweep, load_record, stopped_before_first_trial,
                           sweep_dataset, write_folds)
from search.searcher import search_algorithms
from search.space import SpaceError, SweepSpec, Synthetic, tune_param_space
from trainable.atomic import atomic_write_text
from trainable.cam.lung_segment import check_lung_masks, pspnet_weights
from trainable.data.confounding import confounding_report
from trainable.data.dataset import Dataset, load_dataset
from trainable.data.duplicates import fold_groups
from trainable.data.folds import patient_folds
from trainable.data.holdout import Holdout
from trainable.data.phantom import synthesize
from trainable.models.featureset import FeatureKey
from trainable.models.weights import offline_available
from trainable.prepare import SharedArrays, group_values, prepare_sweep, shared_arrays
from trainable.shared import Prepared
from trainable.trial import run_trial


def results_dir_for(out: str | Path, name: str, log: Callable[[str], None] = print) -> Path:
    """`out/name`, refusing to reuse a directory that already holds a sweep (nothing is overwritten),
    and to nest one inside another sweep's results. A run that stopped before its first trial (bad
    data, too few resources; no trials.csv, no Tune state) does not block its re-run: its directory
    is reused, and that is said."""
    parent = Path(out).expanduser().resolve()
    inside = next((p for p in (parent, *parent.parents) if holds_sweep(p)), None)
    if inside is not None:
        raise SweepError(f"--out {out}: {inside} is a sweep's results directory (it holds space.json or "
                         f"trials.csv); --out is the directory results directories go into: choose another "
                         f"(nothing was changed)")
    d = parent / name
    if not d.exists() or not any(d.iterdir()):
        return d
    if holds_sweep(d) and not (d / "trials.csv").is_file():
        if _tune_state(d):
            raise SweepError(f"{d} holds a sweep that Tune can resume: `cxrtune resume {d}`, or choose "
                             f"another --name (nothing was changed)")
        if stopped_before_first_trial(d):
            log(f"reusing {d}: the run there stopped before its first trial (no trials.csv, no Tune state)")
            _clear_stale_start(d)
            return d
    raise SweepError(f"{d} already holds results; choose another --name (nothing was changed)")


def _tune_state(results: Path) -> bool:
    """Tune saved an experiment state for this results directory (where space.json says, else RESULTS/tune)."""
    try:
        record = load_record(results)
    except (SweepError, ValueError):
        record = {}
    return tune.Tuner.can_restore(record.get("tune_path") or experiment_path(results, None))


def _clear_stale_start(results: Path) -> None:
    """What a run that stopped before its first trial left besides its data: an experiment
    directory without state and a study without finished trials (a pareto sweep's optuna.db)."""
    shutil.rmtree(results / "tune", ignore_errors=True)
    (results / "optuna.db").unlink(missing_ok=True)


def resolve_data(spec: SweepSpec, data: str | None, results: Path, log: Callable[[str], None],
                 data_format: str = "auto") -> Dataset:
    """`--data` wins over the space file; `synthetic` generates the phantom set into results/data.
    `data_format` picks the layout adapter (`trainable.data.adapters`; "auto" detects it)."""
    if data is None and spec.data.path is not None:
        data = spec.data.path
    if data is None or data == "synthetic":
        syn = spec.data.synthetic or Synthetic()
        t0 = time.perf_counter()
        manifest = synthesize(results / "data", n_patients=syn.n_patients, size=syn.size,
                              shortcut=syn.shortcut, seed=syn.seed, lesion_strength=syn.lesion_strength,
                              confound=syn.confound, confound_rate=syn.confound_rate)
        log(f"generated phantom data set ({syn.n_patients} patients, {syn.size}px, shortcut {syn.shortcut}) "
            f"in {time.perf_counter() - t0:.1f}s → {manifest.parent}")
        return load_dataset(manifest.parent, spec.task)
    return load_dataset(Path(data).resolve(), spec.task, data_format)


def feature_keys(spec: SweepSpec) -> list[FeatureKey]:
    return [FeatureKey.of({"backbone": b, "weights": w, "crop_margin": m, "pool": p}, spec.input_size)
            for b, w, m, p in product(spec.choices("backbone"), spec.choices("weights"), spec.choices("crop_margin"),
                                      spec.choices("pool"))]


def check_weights(spec: SweepSpec, log: Callable[[str], None]) -> None:
    """Fail before any work when a backbone (or PSPNet, for `lung_masks: pspnet`) has no weights
    this machine can load."""
    if spec.lung_masks == "pspnet":
        pspnet_weights()  # LungSegmentationError naming the file and the places looked at
    for backbone, weights in product(spec.choices("backbone"), spec.choices("weights")):
        if weights == "random":
            continue
        if weights != "imagenet":
            if not Path(weights).is_file():
                raise SpaceError(f"space.weights: file {weights} does not exist")
            continue
        ok, where = offline_available(backbone)
        if ok:
            continue
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
            raise SpaceError(f"backbone {backbone!r}: no pretrained weights available offline ({where}) "
                             f"and HF_HUB_OFFLINE is set; use `weights: random` or a weights file")
        log(f"warning: backbone {backbone!r} has no offline weights ({where}); they will be downloaded")


def start_ray(address: str | None, log: Callable[[str], None]) -> None:
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_HOME", "TORCH_HOME", "CXRTUNE_ALLOW_DOWNLOAD",
                                      "CXRTUNE_EPOCH_DELAY_S", *STORAGE_ENV) if k in os.environ}
    # Tune starts one trial at a time with a searcher unless more may be pending
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(max(2, int(os.cpu_count() or 2))))
    # checkpoints are a few hundred kB of head weights: Tune's snapshot warning is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env} if env else None)
    res = ray.cluster_resources()
    log(f"ray cluster: {int(res.get('CPU', 0))} CPU, {res.get('GPU', 0):g} GPU, "
        f"{len(ray.nodes())} node(s)")


def run_sweep(spec: SweepSpec, *, space_file: Path | None = None, data: str | None = None,
              out: str | Path = "results", name: str | None = None, address: str | None = None,
              mlflow: str | None = None, tensorboard: bool = False, data_format: str = "auto",
              storage: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Validate, prepare, search, write results and report.html; returns the results directory.

    `storage`: where Tune keeps the experiment (a shared directory or `s3://…`; default RESULTS/tune).
    SIGTERM stops the sweep resumably (`search.durable`)."""
    t_start = time.time()
    results = results_dir_for(out, name or spec.name, log)
    check_weights(spec, log)
    check_storage(storage)  # an unknown scheme, an unreachable endpoint, a missing bucket: one line, now
    # trackers are checked (MLflow installed, URI usable) before any work
    trackers = tracker_callbacks(mlflow, tensorboard, experiment=results.name,
                                 tags={"cxrtune.results": str(results), "cxrtune.space": str(space_file)})
    results.mkdir(parents=True, exist_ok=True)
    # a first record (no data yet) marks the directory as this run's: should the data fail, a re-run
    # under the same name reuses it (results_dir_for); the full record replaces it below
    write_record(results, spec, space_file, data_format, storage)
    dataset = resolve_data(spec, data, results, log, data_format)
    if spec.cam_target not in ("true", "predicted", *dataset.classes):
        raise SpaceError(f"cam_target must be 'true', 'predicted' or one of the classes "
                         f"{list(dataset.classes)} (got {spec.cam_target!r})")
    check_lung_masks(spec.lung_masks, dataset.has_masks, dataset.table["id"].tolist())
    # held-out patients leave here: folds, trials, best/ and selected/ see only `dataset` (search/outputs/heldout.py)
    full, split = dataset, search_split(spec, dataset, log)
    dataset = split.search
    # the folds are checked here, before decoding and before Ray starts
    patient_folds(dataset.labels, fold_groups(dataset), dataset.classes, spec.folds, spec.seed)
    if spec.group_column in dataset.table:
        check_metric_defined(spec.objective.metric, dataset.labels, group_values(dataset, spec.group_column),
                             dataset.classes, spec.min_cell, spec.group_column)
    log(f"data: {len(dataset)} images, {len(set(dataset.patients))} patients, classes "
        + ", ".join(f"{c}={int((dataset.labels == k).sum())}" for k, c in enumerate(dataset.classes)))
    for note in dataset.notes:  # e.g. images a task dropped (covid_vs_viral)
        log(note)
    confounding: list[str] = []  # also in space.json: report.html shows it on its first screen
    if spec.group_column in dataset.table:
        confounding = confounding_report(dataset, spec.group_column)[0]
        for line in confounding:
            log(line)
    # every image is decoded before Ray starts: a corrupt file stops the run here, in seconds
    shared = shared_arrays(dataset, spec.settings(), feature_keys(spec), log)
    write_record(results, spec, space_file, data_format, storage, dataset=dataset, data_hash=full.content_hash(),
                 confounding=confounding)
    write_split(results, split)
    if address and address.startswith("ray://") and not is_uri(storage):
        log("warning: with a ray:// address Tune writes its experiment on the cluster; "
            "use --storage s3://… (or a directory every node and this machine share)")
    start_ray(address, log)
    check_resources(spec, local=address is None, log=log)
    prepared = prepare(spec, dataset, log, shared)
    write_folds(results, prepared.ids, prepared.folds)
    tuner = make_tuner(spec, prepared, results, log, callbacks=trackers, storage=storage)
    return finish_sweep(results, spec, space_file, dataset, prepared, tuner, t_start=t_start,
                        storage=storage, log=log, split=split)


def write_record(results: Path, spec: SweepSpec, space_file: Path | None, data_format: str,
                 storage: str | None, dataset: Dataset | None = None, data_hash: str | None = None,
                 confounding: list[str] | None = None) -> None:
    """space.json: what `cxrtune resume` needs to rebuild the trainable and find the experiment."""
    atomic_write_text(results / "space.json", json.dumps(
        {"spec": spec.model_dump(mode="json"), "settings": asdict(spec.settings()),
         "space_file": str(Path(space_file).resolve()) if space_file else None,
         "data": str(dataset.root) if dataset is not None else None,
         "data_format": data_format, "data_hash": data_hash, "storage": storage,
         "tune_path": experiment_path(results, storage), "confounding": confounding or []},
        indent=2))


def check_resources(spec: SweepSpec, *, local: bool, log: Callable[[str], None]) -> None:
    """A trial (and a feature task) needs `resources` on one node. On a local cluster what the
    machine has is all there is: more is an error now rather than a sweep that waits forever. A
    remote cluster may autoscale, so there it is a warning."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)]
    r = spec.resources
    for field, want, kind in (("cpus_per_trial", r.cpus_per_trial, "CPU"), ("gpus_per_trial", r.gpus_per_trial, "GPU")):
        most = max((float(n.get(kind, 0)) for n in nodes), default=0.0)
        if want <= most:
            continue
        total = sum(float(n.get(kind, 0)) for n in nodes)
        message = (f"resources.{field} is {want:g} but the largest node of the Ray cluster has {most:g} {kind}(s) "
                   f"({total:g} in all on {len(nodes)} node(s)): no trial could start; lower it in the space file")
        if local:
            raise SpaceError(message)
        log(f"warning: {message}, unless the cluster's autoscaler adds such a node")


def resume_sweep(results: str | Path, *, address: str | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Continue a stopped or crashed sweep in place: unfinished and errored trials resume from
    their last checkpoints, finished ones are kept as they are, then the results are written.

    The trainable is rebuilt exactly as the run did: spec from `space.json`, the same data (checked
    by content hash), the same held-out split, `prepare`."""
    t_start = time.time()
    results = Path(results).expanduser().resolve()
    record = load_record(results)
    spec = SweepSpec.model_validate(record["spec"])
    storage = record.get("storage")
    path = record.get("tune_path") or experiment_path(results, storage)
    check_storage(storage)
    if not tune.Tuner.can_restore(path):
        raise SweepError(f"nothing to resume at {path}: the sweep stopped before Tune saved its state; "
                         f"start it again with `cxrtune run --out {results.parent} --name {results.name}` "
                         f"(it reuses the directory)")
    dataset = sweep_dataset(record, spec)
    if record.get("data_hash") and dataset.content_hash() != record["data_hash"]:
        raise SweepError(f"data at {record['data']} changed since the sweep started "
                         f"(content hash {dataset.content_hash()} != {record['data_hash']}); not resuming")
    split = search_split(spec, dataset, log)  # the same held-out patients as the run (checked)
    check_split(results, split)
    dataset = split.search
    shared = shared_arrays(dataset, spec.settings(), feature_keys(spec), log)  # decoded before Ray starts
    start_ray(address, log)
    check_resources(spec, local=address is None, log=log)
    prepared = prepare(spec, dataset, log, shared)
    check_folds(results, prepared.ids, prepared.folds)
    log(f"resuming {path} (unfinished and errored trials continue from their last checkpoints)")
    tuner = tune.Tuner.restore(path, trainable=make_trainable(spec, prepared),
                               resume_unfinished=True, resume_errored=True)
    space_file = record.get("space_file")
    return finish_sweep(results, spec, Path(space_file) if space_file else None, dataset, prepared, tuner,
                        t_start=t_start, storage=storage, log=log, split=split)


def finish_sweep(results: Path, spec: SweepSpec, space_file: Path | None, dataset: Dataset, prepared: Prepared,
                 tuner: tune.Tuner, *, t_start: float, storage: str | None = None,
                 log: Callable[[str], None] = print, split: Holdout | None = None) -> Path:
    """Fit (a new or a restored Tuner), then write results, the selection, the held-out scores of
    best/ and selected/ (`split`: search.outputs.heldout) and report.html.

    SIGTERM during the fit stops Tune gracefully and raises SweepInterrupted (resumable)."""
    with graceful_stop() as stop:
        result_grid = tuner.fit()
    if stop.requested:
        raise SweepInterrupted(results)
    mirror_checkpoints(result_grid, results, storage)  # local copies when the experiment is elsewhere
    write_results(results, spec, space_file, dataset, prepared, result_grid,
                  wall_s=time.time() - t_start, log=log)
    export_selection(results, prepared=prepared, log=log)
    if split is not None:
        score_heldout(results, split, spec, log)
    try:
        write_report(results, hardware=cluster_hardware(), log=log)
    except Exception as e:  # noqa: BLE001 - the sweep's results are written; a report can be redone
        log(f"warning: report.html was not written ({type(e).__name__}: {e}); "
            f"retry with `cxrtune report {results}`")
    publish_results(results, storage, log)
    return results


def prepare(spec: SweepSpec, dataset: Dataset, log: Callable[[str], None],
            shared: SharedArrays | None = None) -> Prepared:
    """Decode (unless `shared` holds the decoded arrays), split and compute the shared features
    once (Ray must be running)."""
    return prepare_sweep(dataset, spec.settings(), feature_keys(spec), spec.choices("augment"),
                         cpus=spec.resources.cpus_per_trial, gpus=spec.resources.gpus_per_trial,
                         progress=log, shared=shared)


def make_trainable(spec: SweepSpec, prepared: Prepared):
    """The function trainable with the shared arrays and the score bound, and its resources."""
    return tune.with_resources(
        tune.with_parameters(run_trial, prepared=prepared, score=make_score(spec.objective)),
        {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial})


def make_tuner(spec: SweepSpec, prepared: Prepared, results: Path,
               log: Callable[[str], None], callbacks: list[tune.Callback] | None = None,
               storage: str | None = None) -> tune.Tuner:
    """`callbacks`: Tune logger callbacks (search.callbacks.trackers); default CSV + JSON, no trackers.
    `storage`: Tune's experiment goes to STORAGE/<name>/tune (default RESULTS/tune)."""
    storage_path, tune_name = tune_location(results, storage)
    trainable = make_trainable(spec, prepared)
    # pareto mode: a multi-objective searcher and ASHA on the weighted score (search/searcher.py)
    searcher, scheduler, metric, mode = search_algorithms(spec, results)
    return tune.Tuner(
        trainable,
        param_space=tune_param_space(spec),
        tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=searcher,
                                    scheduler=scheduler, num_samples=spec.num_samples,
                                    max_concurrent_trials=spec.max_concurrent or None,
                                    # a trial's start-up (worker process, imports, torch threads) is
                                    # most of Tune's per-trial cost; run_trial keeps no state between
                                    # trials, so one actor serves many (benchmarks/README.md: 61 s → 16 s)
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=tune_name, storage_path=storage_path, verbose=0,
            # the head epochs: ProgressLine adds each trial's own ft_epochs (reported like head epochs)
            callbacks=[ProgressLine(spec.num_samples, spec.epochs, spec.objective.metric, log),
                       LiveTrials(results, spec.epochs),
                       *(tracker_callbacks() if callbacks is None else callbacks)],
            # the best epoch by the per-epoch `objective` plus the latest (Ray always keeps the latest:
            # resume and the montages read it), so Result.get_best_checkpoint("objective", "max") is the
            # best epoch. Not running_objective: it ties from the best epoch on, and Ray breaks ties
            # towards the later checkpoint.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="objective",
                                                    checkpoint_score_order="max"),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures)),
    )

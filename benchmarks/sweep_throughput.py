"""Sweep throughput: the naive way vs cxrtune's shared fast path, and the lower bound.

The same space, data, trial configs and seeds, back to back in one invocation:

* ``lower bound`` — in this process, no Ray: one backbone pass over the unique (backbone, crop,
  view) set (`trainable.models.features.compute_features`), plus the head training and Grad-CAM of every
  trial (`trainable.train.head_stage.run_epoch`), each job timed alone on the threads a trial gets, the sum
  divided by the number of jobs that run at once (perfect packing of exactly the necessary work).
* ``cxrtune`` — the real thing, cold: `trainable.prepare.prepare_sweep` (decode + image cache,
  each key once — on this one-node cluster in the driver's threads —, disk feature cache in a
  fresh directory) and a Ray Tune Tuner running
  `trainable.trial.run_trial` for every trial.
* ``cxrtune, warm disk cache`` — the same sweep again: decoded images and features read from the
  on-disk cache the cold run wrote (what the next sweep on the same data pays).
* ``naive`` — a Ray Tune Tuner running `benchmarks.naive.run_naive_trial`: every trial runs the
  backbone over every image of every fold in every epoch, and scores Grad-CAM with pytorch-grad-cam
  on the full model (``--naive-cam reference``, as a plain trainable would) or with cxrtune's exact
  formula on the maps it just computed (``--naive-cam fast``). The full run may time only some
  trial-epochs (``--naive-trial-epochs``, at least 8) and extrapolate; it says so when it does.

Trials are drawn once from the space with a seeded RNG and run with a FIFO scheduler (no early
stopping), so every mode does the same work. Not counted in any mode: starting Ray, and the
driver's imports. The benchmark imports what `cxrtune run` has imported before its sweep starts
(`search.sweep`): otherwise Tune's first `Tuner.fit` with callbacks imports its tracker
integrations (mlflow, which the test extra installs: ≈ 0.7 s) inside whichever mode runs first. Usage::

    python benchmarks/sweep_throughput.py --quick                 # both modes in full, < 5 min
    python benchmarks/sweep_throughput.py                         # the issue's full benchmark
    python benchmarks/sweep_throughput.py --data synthetic --quick  # anywhere (phantom data)

See benchmarks/README.md for the measured tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download weights in a benchmark

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from ray import tune  # noqa: E402

import benchmarks.naive as naive  # noqa: E402
import search.sweep  # noqa: E402,F401 - the CLI's driver modules, imported before any mode is timed (docstring)
from search.objective import make_score  # noqa: E402
from search.space import Choice, LogUniform, RandInt, SweepSpec, Uniform, load_space  # noqa: E402
from trainable.cache import directory_size  # noqa: E402
from trainable.data.dataset import Dataset, load_dataset  # noqa: E402
from trainable.data.phantom import synthesize  # noqa: E402
from trainable.models.featureset import FeatureKey  # noqa: E402
from trainable.prepare import prepare_local, prepare_sweep  # noqa: E402
from trainable.shared import Prepared, Settings, with_defaults  # noqa: E402
from trainable.trial import run_trial  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cxr-real"
GiB = 1024 ** 3
# the full benchmark, and a quick one that runs every mode in full in a few minutes
FULL = dict(images=600, trials=16, folds=4, epochs=8, input_size=224, base_size=256, naive_trial_epochs=8)
QUICK = dict(images=80, trials=4, folds=3, epochs=2, input_size=96, base_size=112, naive_trial_epochs=0)


# --------------------------------------------------------------------------- measuring


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _rss_parts(pid: int) -> tuple[int, int, int]:
    """(private anonymous, shared memory, file-backed) resident bytes, from /proc/PID/status (cheap:
    smaps_rollup's PSS costs ~10 ms per Ray process, which would load a 2-core machine measurably)."""
    parts = {"RssAnon:": 0, "RssShmem:": 0, "RssFile:": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name = line.split(maxsplit=1)[0] if line else ""
            if name in parts:
                parts[name] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return parts["RssAnon:"], parts["RssShmem:"], parts["RssFile:"]


class TreeMemory(threading.Thread):
    """Peak resident memory of this process and all its descendants (Ray's GCS, raylet, object
    store, workers), sampled every `interval` s: Σ private anonymous RSS + Σ shared-memory RSS
    (object-store pages count once per process that maps them: an over-estimate) + the largest
    file-backed RSS (the same shared libraries in every process, counted once)."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_event = interval, 0, threading.Event()

    def run(self) -> None:
        if not Path("/proc/self/status").exists():  # not Linux: no numbers
            return
        while not self._stop_event.is_set():
            tree, todo, anon, shm, file = _children(), [os.getpid()], 0, 0, 0
            while todo:
                pid = todo.pop()
                a, s, f = _rss_parts(pid)
                anon, shm, file = anon + a, shm + s, max(file, f)
                todo.extend(tree.get(pid, []))
            self.peak = max(self.peak, anon + shm + file)
            self._stop_event.wait(self.interval)

    def take(self) -> int:
        """The peak since the last call; starts a new window."""
        peak, self.peak = self.peak, 0
        return peak

    def stop(self) -> None:
        self._stop_event.set()


# --------------------------------------------------------------------------- data and trials


def subsample_by_patient(ds: Dataset, n_images: int, seed: int) -> Dataset:
    """At most `n_images` images, whole patients only, each class in its share of the data."""
    if n_images >= len(ds):
        return ds
    rng = np.random.default_rng(seed)
    patients = ds.patients
    first_label = {p: ds.labels[i] for i, p in reversed(list(enumerate(patients)))}
    keep: list[int] = []
    for c in range(len(ds.classes)):
        group = np.array(sorted(p for p, lab in first_label.items() if lab == c))
        rng.shuffle(group)
        quota, taken = round(n_images * (ds.labels == c).mean()), 0
        for p in group:
            idx = np.flatnonzero(patients == p)
            if taken + len(idx) > quota:
                continue
            keep.extend(idx.tolist())
            taken += len(idx)
    keep.sort()
    return dataclasses.replace(ds, table=ds.table.iloc[keep].reset_index(drop=True), labels=ds.labels[keep])


def load_data(arg: str, n_images: int, task: str, base_size: int, seed: int, work: Path) -> Dataset:
    if arg == "synthetic":
        n_patients = max(12, math.ceil(n_images / 2.2))
        manifest = synthesize(work / "phantom", n_patients=n_patients, size=base_size, shortcut=0.9, seed=seed)
        ds = load_dataset(manifest.parent, task)
    else:
        ds = load_dataset(Path(arg).resolve(), task)
    return subsample_by_patient(ds, n_images, seed)


def draw_trials(spec: SweepSpec, n: int, seed: int) -> list[dict]:
    """`n` trial configs drawn from the space with a seeded RNG (the same in every mode)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        config = {}
        for key, p in spec.space.items():
            if isinstance(p, Choice):
                config[key] = p.choice[int(rng.integers(len(p.choice)))]
            elif isinstance(p, Uniform):
                config[key] = float(rng.uniform(*p.uniform))
            elif isinstance(p, LogUniform):
                config[key] = float(np.exp(rng.uniform(*np.log(p.loguniform))))
            elif isinstance(p, RandInt):
                config[key] = int(rng.integers(*p.randint))
            else:
                config[key] = p
        out.append(config)
    return out


# --------------------------------------------------------------------------- the modes


def lower_bound(dataset: Dataset, settings: Settings, keys: list[FeatureKey], policies: list[str],
                configs: list[dict], score, cpus: int, cpus_per_trial: int, mem: TreeMemory) -> dict:
    # every job on the threads a trial (or a feature task) gets, one after the other; the bound is
    # that work spread perfectly over the machine: Σ seconds / jobs at once, and no Ray at all
    torch.set_num_threads(cpus_per_trial)
    prepared = prepare_local(dataset, dataclasses.replace(settings, cache_dir="off"), keys, policies,
                             progress=lambda m: None)
    fss = [prepared.feature_set(k) for k in keys]
    feature_s = sum(fs.seconds for fs in fss)
    images = sum(fs.images_through_backbone for fs in fss)
    history, head_s = {}, 0.0
    for i, config in enumerate(configs):
        t0 = time.perf_counter()
        history[i] = [m | {"objective": float(score(m))} for m, _ in naive.cached_epochs(config, prepared)]
        head_s += time.perf_counter() - t0
    torch.set_num_threads(cpus)
    concurrency = max(1, cpus // cpus_per_trial)
    wall = (feature_s + head_s) / concurrency
    feature_bytes = sum(fs.maps.nbytes + sum(p.nbytes for p in fs.pooled.values()) for fs in fss)
    del prepared, fss
    gc.collect()
    return dict(mode="lower bound (in-process, no Ray, perfect packing)", wall_s=wall, backbone_images=images,
                backbone_rate=images / (feature_s / concurrency), feature_s=feature_s, head_s=head_s,
                head_s_per_core=head_s / concurrency,
                cache_bytes=feature_bytes, cache_note="features in memory", rss=mem.take(), history=history)


def _fit(name: str, fn, prepared: Prepared, configs: list[dict], score, cpus_per_trial: int,
         storage: Path, log, reuse_actors: bool = False, **kwargs) -> dict[int, list[dict]]:
    """Run every config once through a Tuner (FIFO, no early stopping); per-trial epoch histories."""

    def trainable(cfg: dict, prepared: Prepared, score, configs: list[dict], kwargs: dict) -> None:
        fn(configs[cfg["trial"]], prepared, score, **kwargs)

    class Done(tune.Callback):
        done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            log(f"    {name}: trial {trial.config['trial']} done ({self.done}/{len(configs)}, "
                f"{time.perf_counter() - t0:.0f}s)")

    t0 = time.perf_counter()

    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, prepared=prepared, score=score, configs=configs,
                                                 kwargs=kwargs), {"cpu": cpus_per_trial, "gpu": 0}),
        param_space={"trial": tune.grid_search(list(range(len(configs))))},
        tune_config=tune.TuneConfig(metric="objective", mode="max", num_samples=1, reuse_actors=reuse_actors),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0, callbacks=[Done()],
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    grid = tuner.fit()
    out = {}
    for r in grid:
        if r.error is not None:
            raise RuntimeError(f"{name} trial {r.config['trial']} failed: {r.error}")
        out[r.config["trial"]] = r.metrics_dataframe.sort_values("epoch").to_dict("records")
    return out


def cxrtune_mode(label: str, dataset: Dataset, settings: Settings, keys, policies, configs, score,
                 cpus_per_trial: int, storage: Path, mem: TreeMemory, log, reuse_actors: bool = False
                 ) -> tuple[dict, Prepared]:
    t0 = time.perf_counter()
    prepared = prepare_sweep(dataset, settings, keys, policies, cpus=cpus_per_trial,
                             progress=lambda m: log("    " + m.strip()))
    prep_s = time.perf_counter() - t0
    fss = [prepared.feature_set(k) for k in keys]  # zero-copy views into the object store
    images = sum(fs.images_through_backbone for fs in fss)
    feature_bytes = sum(fs.maps.nbytes + sum(p.nbytes for p in fs.pooled.values()) for fs in fss)
    del fss
    history = _fit(label.split()[0] + ("-warm" if "warm" in label else ""), run_trial, prepared, configs, score,
                   cpus_per_trial, storage, log, reuse_actors)
    wall = time.perf_counter() - t0
    cache = directory_size(settings.cache_dir)
    epoch_s = [r["time_this_iter_s"] for h in history.values() for r in h]
    return dict(mode=label, wall_s=wall, prepare_s=prep_s, epoch_s_mean=float(np.mean(epoch_s)),
                epoch_s_total=float(np.sum(epoch_s)), feature_s=prepared.timings.get("features_s", 0.0),
                decode_s=prepared.timings.get("decode_s", 0.0), backbone_images=images,
                backbone_rate=images / prepared.timings["features_s"] if images else float("nan"),
                cache_bytes=cache, object_store_feature_bytes=feature_bytes,
                cache_note=f"disk {cache / GiB:.2f} GiB + object store {feature_bytes / GiB:.2f} GiB",
                rss=mem.take(), history=history), prepared


def naive_mode(prepared: Prepared, configs: list[dict], score, cpus_per_trial: int, concurrency: int,
               budget: int, storage: Path, mem: TreeMemory, log, reuse_actors: bool = False,
               cam: str = "reference") -> dict:
    """All trials in full (budget 0), or >= `budget` trial-epochs spread over the backbones, extrapolated."""
    epochs = prepared.settings.epochs
    total = len(configs) * epochs
    if budget <= 0 or budget >= total:
        chosen, run_epochs = list(range(len(configs))), epochs
    else:  # round-robin over backbones so each one's per-epoch cost is measured
        by_backbone: dict[str, list[int]] = {}
        for i, c in enumerate(configs):
            by_backbone.setdefault(c["backbone"], []).append(i)
        order = [i for group in zip(*[iter(v) for v in by_backbone.values()]) for i in group] or list(range(len(configs)))
        n = min(len(configs), max(concurrency, len(by_backbone)))
        chosen = order[:n]
        run_epochs = min(epochs, math.ceil(budget / n))
    t0 = time.perf_counter()
    history = _fit("naive", naive.run_naive_trial, prepared, [configs[i] for i in chosen], score, cpus_per_trial,
                   storage, log, reuse_actors, epochs=run_epochs, cam=cam)
    measured = time.perf_counter() - t0
    history = {chosen[j]: h for j, h in history.items()}
    rows = [r for h in history.values() for r in h]
    images = sum(r["backbone_images"] for r in rows)
    backbone_s = sum(r["backbone_s"] for r in rows)
    out = dict(mode=f"naive (backbone in every trial, fold and epoch; {cam} Grad-CAM)", measured_wall_s=measured,
               trial_epochs_run=len(rows), backbone_images=images, backbone_rate=images / (backbone_s / concurrency),
               cache_bytes=0, cache_note="none", history=history, extrapolated=False)
    if len(chosen) == len(configs) and run_epochs == epochs:
        out["wall_s"] = measured
    else:  # per-backbone epoch time, measured while `concurrency` trials ran at once
        per_epoch: dict[str, list[float]] = {}
        for i, h in history.items():
            per_epoch.setdefault(configs[i]["backbone"], []).extend(r["time_this_iter_s"] for r in h)
        epoch_s = {b: float(np.mean(v)) for b, v in per_epoch.items()}
        work = sum(epochs * epoch_s[c["backbone"]] for c in configs) / concurrency
        # start-up and the rest of the timed run's wall outside its longest trial, counted once
        startup = max(0.0, measured - max(sum(r["time_this_iter_s"] for r in h) for h in history.values()))
        per_image = images / max(len(rows), 1)
        out.update(wall_s=work + startup, extrapolated=True, epoch_s=epoch_s, startup_s=startup,
                   backbone_images=int(per_image * total), timed_trials=len(chosen), timed_epochs=run_epochs)
    out["rss"] = mem.take()
    return out


# --------------------------------------------------------------------------- report


def _same_answers(a: dict[int, list[dict]], b: dict[int, list[dict]]) -> dict[str, float]:
    """Largest |difference| of a few per-epoch metrics over the (trial, epoch) pairs both have."""
    keys = ("objective", "balanced_accuracy", "loss", "lung_mass", "edge_mass")
    worst = dict.fromkeys(keys, 0.0)
    for i in set(a) & set(b):
        for ra, rb in zip(a[i], b[i]):
            for k in keys:
                if k in ra and k in rb and np.isfinite(ra[k]) and np.isfinite(rb[k]):
                    worst[k] = max(worst[k], abs(float(ra[k]) - float(rb[k])))
    return worst


def _trial_phase(row: dict, concurrency: int) -> str:
    """How much of a Tuner's wall time the trials' epochs account for; the rest is Ray/Tune per-trial cost."""
    epochs = row["epoch_s_total"] / concurrency
    return (f"epochs {epochs:.1f}s = Σ epoch time {row['epoch_s_total']:.1f}s / {concurrency} at once, mean epoch "
            f"{row['epoch_s_mean']:.2f}s incl. report + checkpoint; the other "
            f"{row['wall_s'] - row['prepare_s'] - epochs:.1f}s: trial start-up (actor, imports) and Tune")


def table(rows: list[dict], n_trials: int) -> str:
    lines = ["| mode | wall s | trials/h | backbone images | backbone img/s | peak RSS GiB | cache |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        rate = r["backbone_rate"]
        lines.append(f"| {r['mode']}{' — extrapolated' if r.get('extrapolated') else ''} | {r['wall_s']:.1f} | "
                     f"{n_trials / r['wall_s'] * 3600:.0f} | {r['backbone_images']:,} | "
                     f"{rate:.0f} | {r['rss'] / GiB:.2f} | {r['cache_note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA),
                    help="data directory (default ../shared/data/cxr-real), or 'synthetic' (phantom data)")
    ap.add_argument("--space", default="default", help="space file or name (default: spaces/default.yaml)")
    ap.add_argument("--quick", action="store_true", help="small sizes: every mode in full in a few minutes")
    for name in ("images", "trials", "folds", "epochs", "input_size", "base_size"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--views", type=int, default=None, help="cached augmentation views (default: the space's)")
    ap.add_argument("--fixed", action="append", default=[], metavar="KEY=VALUE",
                    help="fix a searched parameter, e.g. --fixed augment=none (repeatable)")
    ap.add_argument("--naive-trial-epochs", type=int, default=None,
                    help="time the naive mode on this many trial-epochs (>= 8) and extrapolate; 0 = run it all")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cpus-per-trial", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warm", action=argparse.BooleanOptionalAction, default=None,
                    help="also run cxrtune a second time on the warm disk cache (default: on, off with --quick)")
    ap.add_argument("--reuse-actors", action=argparse.BooleanOptionalAction, default=True,
                    help="Tune reuse_actors in both modes (default on, as search.sweep.make_tuner does)")
    ap.add_argument("--naive-cam", choices=("reference", "fast"), default="reference",
                    help="naive Grad-CAM: pytorch-grad-cam on the full model (reference, default) or the "
                         "exact formula on the maps the naive epoch computed (fast)")
    ap.add_argument("--cache-dir", default=None, help="feature/image cache (default: a fresh temporary one)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    warm_too = (not args.quick) if args.warm is None else args.warm
    sizes = {**(QUICK if args.quick else FULL),
             **{k: getattr(args, k) for k in (*FULL,) if getattr(args, k) is not None}}
    if 0 < sizes["naive_trial_epochs"] < 8:
        ap.error("--naive-trial-epochs must be 0 (run it all) or >= 8")
    if args.data != "synthetic" and not Path(args.data).is_dir():
        if args.data == str(DEFAULT_DATA):
            print(f"skipped: the benchmark data {DEFAULT_DATA} is not on this machine; "
                  f"run with --data synthetic (phantom chest X-rays) or --data DIR")
            return 0
        print(f"error: --data {args.data} is not a directory", file=sys.stderr)
        return 2
    log = lambda m: print(m, flush=True)  # noqa: E731
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` still shuts Ray down and cleans up
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    work = Path(tempfile.mkdtemp(prefix="cxrtune-bench-"))
    cache_dir = Path(args.cache_dir).resolve() if args.cache_dir else work / "cache"
    mem = TreeMemory()
    mem.start()
    try:
        spec = load_space(args.space)
        spec = spec.model_copy(update=dict(folds=sizes["folds"], epochs=sizes["epochs"], num_samples=sizes["trials"],
                                           input_size=sizes["input_size"], base_size=sizes["base_size"],
                                           **({"views": args.views} if args.views else {})))
        for item in args.fixed:
            key, _, value = item.partition("=")
            spec = SweepSpec.model_validate({**spec.model_dump(mode="json"),
                                             "space": {**spec.model_dump(mode="json")["space"],
                                                       key: yaml.safe_load(value)}})
        settings = dataclasses.replace(spec.settings(), cache_dir=str(cache_dir))
        dataset = load_data(args.data, sizes["images"], spec.task, sizes["base_size"], args.seed, work)
        configs = draw_trials(spec, sizes["trials"], args.seed)
        keys = sorted({FeatureKey(c["backbone"], str(c["weights"]), float(c["crop_margin"]), settings.input_size)
                       for c in map(with_defaults, configs)}, key=str)
        policies = sorted({with_defaults(c)["augment"] for c in configs})
        score = make_score(spec.objective)
        cpt = args.cpus_per_trial
        concurrency = max(1, args.cpus // cpt)
        log(f"$ {command}")
        log(f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
            f"load average {os.getloadavg()[0]:.1f} (others' work shares these cores), torch {torch.__version__}")
        log(f"data: {dataset.root} — {len(dataset)} images, {len(set(dataset.patients))} patients, "
            + ", ".join(f"{c}={int((dataset.labels == k).sum())}" for k, c in enumerate(dataset.classes)))
        log(f"sweep: {len(configs)} trials × {settings.folds} folds × {settings.epochs} epochs at "
            f"{settings.input_size}px (base {settings.base_size}px), {settings.views} views, Grad-CAM every epoch; "
            f"{len(keys)} feature keys, augment {policies}; {cpt} CPU per trial, {concurrency} at once")
        for i, c in enumerate(configs):
            log(f"  trial {i:2d}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in c.items() if k != "weights"))
        rows = []
        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_HOME") if k in os.environ}})
        ray.cloudpickle.register_pickle_by_value(naive)  # workers need not import benchmarks/
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        log(f"ray started in {time.perf_counter() - t0:.1f}s (not counted in any mode)")
        mem.take()
        reuse = args.reuse_actors

        log("cxrtune: prepare_sweep (cold cache) + Tuner(run_trial)")
        cx, prepared = cxrtune_mode("cxrtune (cold cache)", dataset, settings, keys, policies, configs, score,
                                    cpt, work / "tune", mem, log, reuse)
        log(f"  {cx['wall_s']:.1f}s: prepare {cx['prepare_s']:.1f}s (decode {cx['decode_s']:.1f}s, "
            f"features {cx['feature_s']:.1f}s), trials {cx['wall_s'] - cx['prepare_s']:.1f}s "
            f"({_trial_phase(cx, concurrency)})")
        rows.append(cx)
        if warm_too:
            del prepared
            gc.collect()
            log("cxrtune again on the warm disk cache (the next sweep over the same data)")
            warm, prepared = cxrtune_mode("cxrtune (warm disk cache)", dataset, settings, keys, policies, configs,
                                          score, cpt, work / "tune", mem, log, reuse)
            log(f"  {warm['wall_s']:.1f}s: prepare {warm['prepare_s']:.1f}s, trials {warm['wall_s'] - warm['prepare_s']:.1f}s "
                f"({_trial_phase(warm, concurrency)})")
            rows.append(warm)

        log(f"naive: Tuner(run_naive_trial), {args.naive_cam} Grad-CAM")
        bare = dataclasses.replace(prepared, features={})  # the decoded images only: no feature cache
        del prepared
        gc.collect()
        nv = naive_mode(bare, configs, score, cpt, concurrency, sizes["naive_trial_epochs"], work / "tune", mem, log,
                        reuse, args.naive_cam)
        del bare
        rows.insert(0, nv)
        if nv["extrapolated"]:
            log(f"  EXTRAPOLATED: naive timed on {nv['timed_trials']} trials × {nv['timed_epochs']} epochs = "
                f"{nv['trial_epochs_run']} trial-epochs in {nv['measured_wall_s']:.1f}s; per-epoch time by backbone "
                + ", ".join(f"{b} {s:.1f}s" for b, s in nv["epoch_s"].items())
                + f" (with {concurrency} trials at once); estimate = Σ over all {len(configs)} trials of "
                  f"epochs × epoch time / {concurrency} + {nv['startup_s']:.1f}s start-up counted once")
        else:
            log(f"  {nv['wall_s']:.1f}s, all {nv['trial_epochs_run']} trial-epochs run")
        ray.shutdown()

        log("lower bound: one backbone pass + every trial's heads and Grad-CAM, in this process, no Ray")
        gc.collect()
        mem.take()
        lb = lower_bound(dataset, settings, keys, policies, configs, score, args.cpus, cpt, mem)
        log(f"  features {lb['feature_s']:.1f}s ({lb['backbone_images']} images) + heads and Grad-CAM "
            f"{lb['head_s']:.1f}s, one job at a time on {cpt} thread(s); / {concurrency} at once = {lb['wall_s']:.1f}s")
        rows.append(lb)

        log("\nsame answers (largest |difference| per (trial, epoch), same configs and seeds):")
        log("  cxrtune vs lower bound: " + ", ".join(f"{k} {v:.1e}" for k, v in _same_answers(cx["history"], lb["history"]).items()))
        log("  naive vs cxrtune:       " + ", ".join(f"{k} {v:.1e}" for k, v in _same_answers(nv["history"], cx["history"]).items()))

        log(f"\n$ {command}")
        log(f"load average at the end: {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[1]:.1f} (5 min)\n")
        log(table(rows, len(configs)))
        log(f"\nnaive / cxrtune (cold) = {nv['wall_s'] / cx['wall_s']:.1f}×"
            + (" (naive EXTRAPOLATED from the timed trial-epochs, see above)" if nv["extrapolated"] else ""))
        log(f"cxrtune (cold) / lower bound = {cx['wall_s'] / lb['wall_s']:.2f}×")
        if warm_too:
            log(f"naive / cxrtune (warm) = {nv['wall_s'] / rows[2]['wall_s']:.1f}×; "
                f"cxrtune (warm) / lower bound = {rows[2]['wall_s'] / lb['wall_s']:.2f}×")
        log(f"feature cache: {directory_size(cache_dir) / GiB:.2f} GiB on disk ({cache_dir})")
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"command": command, "sizes": sizes, "configs": configs,
                 "rows": [{k: v for k, v in r.items() if k != "history"} for r in rows]}, indent=2, default=str))
        return 0
    finally:
        mem.stop()
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

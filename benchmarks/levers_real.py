"""The training levers on cxr-real: 8 fixed arms and the sweep of spaces/rightreasons-cpu.yaml.

On `covid_vs_rest` with the held-out patients of `real_cxr.py` (holdout 0.2, seed 0: the search
never sees them), it runs

* the 8 arms {cam_loss 0, λ} × {balance class, group} × {head only, fine-tuned} as fixed
  configurations, one trial each, in one Tune run over one `Prepared` (same folds, same features,
  same held-out split; FIFO, no ASHA, so every arm trains to its last epoch). Each arm's row is its
  **last** epoch (for a fine-tuned arm: after the ft stage, restored to its best ft epoch by the
  inner-split loss), not an epoch picked by a metric, so the arms are compared as trained;
* the sweep of `spaces/rightreasons-cpu.yaml` (`search.sweep.run_sweep`: Optuna + ASHA, objective
  within_group_auc + w·focus) and what it selects, through `real_cxr.task_summary` (CV, held-out
  and group metrics of the metric-best, selected and objective-best trials).

Writes `results/example-real/levers.md` and `levers.json` (committed; no per-image rows). The
sweep itself (models, Grad-CAM montages of patients, report.html) and the arms' Tune directory go
to `results/example-real/sweeps/`, which that directory's .gitignore keeps out of git; the
sweep's image-free tables go to `results/example-real/rightreasons/`.

    python benchmarks/levers_real.py            # ≈ 25–35 min on 2 shared cores
    python benchmarks/levers_real.py --quick    # smoke run: 15% of the patients, tiny epochs, 96 px

Exits 0 with a message when the data is absent.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download weights in a benchmark

from real_cxr import (
    ADULT_NON_COVID,
    DEFAULT_DATA,
    DEFAULT_OUT,
    ignore_sweeps,
    plain,
    task_summary,
)
from real_cxr import fmt_value as f

SPACE = ROOT / "spaces" / "rightreasons-cpu.yaml"
TASK = "covid_vs_rest"
GROUP, CELL = ADULT_NON_COVID[TASK]
RECALL = f"recall_{GROUP}_{CELL}"
COVID_RECALL = f"recall_{GROUP}_covid"   # what group weights trade for the adult non-COVID cell
# what each arm fixes; every other key is the space's own fixed value or ARM_FIXED
ARM_FIXED = {"backbone": "efficientnet_lite0", "crop_margin": 0.08, "lr": 1.0e-3}
TARGET = {"worst_group_accuracy": 0.5, "balanced_accuracy": 0.90}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--cam-loss", type=float, default=1.0, help="λ of the cam_loss arms")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6, help="head epochs (arms and sweep)")
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--ft-blocks", type=int, default=2)
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument("--num-samples", type=int, default=6, help="trials of the rightreasons-cpu sweep (0 = skip it)")
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 85%% of the patients held out, 2 folds, 2+1 epochs, 96 px, 2 sweep trials")
    args = ap.parse_args(argv)
    if args.quick:
        args.holdout, args.folds, args.epochs, args.ft_epochs, args.input_size = 0.85, 2, 2, 1, 96
        args.num_samples = min(args.num_samples, 2)
    data = Path(args.data)
    if not (data / "manifest.csv").is_file():
        print(f"skipped: no cxr-real data at {data} (manifest.csv not found)")
        return 0

    import ray
    import yaml

    from search.sweep import start_ray

    out = Path(args.out).resolve()
    sweeps = out / "sweeps"
    sweeps.mkdir(parents=True, exist_ok=True)
    ignore_sweeps(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = yaml.safe_load(SPACE.read_text())
    base.update(task=TASK, folds=args.folds, epochs=args.epochs, holdout=args.holdout, seed=args.seed,
                input_size=args.input_size, base_size=max(base["base_size"], args.input_size + 32),
                data={"path": str(data)})
    base["asha"]["grace_period"] = min(base["asha"]["grace_period"], args.epochs)
    base["space"].update(ft_blocks=args.ft_blocks)
    summary: dict = {"command": " ".join(["python", *sys.argv]), "data": str(data), "space": SPACE.name,
                     "cpus": os.cpu_count(), "task": TASK, "cam_loss": args.cam_loss, "folds": args.folds,
                     "epochs": args.epochs, "ft_epochs": args.ft_epochs, "ft_blocks": args.ft_blocks,
                     "input_size": args.input_size, "holdout": args.holdout, "quick": args.quick,
                     "target": TARGET, "adult_non_covid_cell": f"{GROUP} × {CELL}"}
    t_all = time.time()
    start_ray(None, print)
    try:
        t0 = time.time()
        summary["arms"] = run_arms(base, args, data, sweeps / f"levers-arms-{stamp}")
        summary["arms_wall_s"] = round(time.time() - t0, 1)
        write_outputs(out, summary, args)  # the arms' table now, should the sweep be stopped
        if args.num_samples > 0:
            summary["sweep"] = run_space_sweep(base, args, data, sweeps, stamp, out / "rightreasons")
    finally:
        ray.shutdown()
    summary["wall_s"] = round(time.time() - t_all, 1)
    md = write_outputs(out, summary, args)
    print("\n" + md)
    print(f"written: {out}/levers*.md, levers*.json (sweeps, git-ignored: {sweeps})")
    return 0


def write_outputs(out: Path, summary: dict, args: argparse.Namespace) -> str:
    summary["reached_target"] = reached(summary)
    md = levers_markdown(summary)
    suffix = "-quick" if args.quick else ""
    (out / f"levers{suffix}.md").write_text(md)
    (out / f"levers{suffix}.json").write_text(json.dumps(plain(summary), indent=1, allow_nan=False))
    return md


# ------------------------------------------------------------------------------ the 8 arms

def arm_spec(base: dict, args: argparse.Namespace) -> dict:
    """The space with every key fixed except the three levers, which become a grid."""
    raw = json.loads(json.dumps(base))
    raw.update(name="levers-arms", num_samples=1)
    space = {k: v for k, v in raw["space"].items() if not isinstance(v, dict)}  # the space's fixed values
    space.update(ARM_FIXED, cam_loss={"choice": [0.0, args.cam_loss]}, balance={"choice": ["class", "group"]},
                 ft_epochs={"choice": [0, args.ft_epochs]})
    raw["space"] = space
    return raw


def run_arms(base: dict, args: argparse.Namespace, data: Path, results: Path) -> list[dict]:
    """One Tune run of the 2×2×2 grid over one Prepared (what run_sweep prepares), FIFO, no export."""
    from ray import tune

    from search.outputs.heldout import search_split
    from search.space import SweepSpec, tune_param_space
    from search.sweep import feature_keys, make_trainable, prepare, resolve_data
    from trainable.prepare import shared_arrays

    spec = SweepSpec.model_validate(arm_spec(base, args))
    results.mkdir(parents=True, exist_ok=True)
    dataset = resolve_data(spec, str(data), results, print)
    split = search_split(spec, dataset, print)  # the same held-out patients as the sweep and real_cxr.py
    ds = split.search
    print(f"\n=== arms: 8 fixed configurations × {spec.folds} folds, {len(ds)} images, {spec.input_size} px ===")
    shared = shared_arrays(ds, spec.settings(), feature_keys(spec), print)
    prepared = prepare(spec, ds, print, shared)
    param_space = tune_param_space(spec)
    for key in ("cam_loss", "balance", "ft_epochs"):  # every combination once: a grid, not a draw
        param_space[key] = tune.grid_search(list(spec.space[key].choice))
    tuner = tune.Tuner(
        make_trainable(spec, prepared), param_space=param_space,
        tune_config=tune.TuneConfig(metric="running_objective", mode="max", num_samples=1, reuse_actors=True),
        run_config=tune.RunConfig(name="tune", storage_path=str(results), verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    grid = tuner.fit()
    arms = [arm_row(r) for r in grid]
    return sorted(arms, key=lambda a: (a["ft_epochs"] > 0, a["balance"], a["cam_loss"]))


def arm_row(result) -> dict:
    """An arm at its last epoch (and its best-objective epoch, for reference)."""
    cfg = result.config or {}
    row = {"cam_loss": cfg.get("cam_loss"), "balance": cfg.get("balance"), "ft_epochs": cfg.get("ft_epochs"),
           "ft_blocks": cfg.get("ft_blocks") if cfg.get("ft_epochs") else None, "backbone": cfg.get("backbone")}
    h = result.metrics_dataframe
    if result.error is not None or h is None or h.empty:
        row["error"] = str(result.error).splitlines()[0] if result.error else "no metrics reported"
        return row
    last = h.iloc[-1]
    best = h.loc[h["objective"].idxmax()]
    keys = ("balanced_accuracy", "auc", "worst_group_accuracy", RECALL, COVID_RECALL, "within_group_auc", "lung_mass",
            "edge_mass", "focus", "objective")
    row.update({k: last.get(k) for k in keys}, epochs_run=int(last["training_iteration"]),
               trial_s=float(last["time_total_s"]), best_epoch=int(best["epoch"]),
               best={k: best.get(k) for k in keys})
    return row


# ------------------------------------------------------------------------------ the sweep

def run_space_sweep(base: dict, args: argparse.Namespace, data: Path, sweeps: Path, stamp: str,
                    dest: Path) -> dict:
    import yaml

    from search.space import SweepSpec
    from search.sweep import run_sweep

    raw = json.loads(json.dumps(base))
    raw.update(name="rightreasons", num_samples=args.num_samples)
    raw["space"]["ft_epochs"] = {"choice": [0, args.ft_epochs]}
    spec = SweepSpec.model_validate(raw)
    space_file = sweeps / f"rightreasons-{stamp}.yaml"
    space_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    print(f"\n=== sweep {SPACE.name}: {args.num_samples} trials × ≤{spec.total_epochs()} epochs ===")
    t0 = time.time()
    results = run_sweep(spec, space_file=space_file, data=str(data), out=sweeps, name=f"rightreasons-{stamp}",
                        log=print)
    s = task_summary(results, spec, time.time() - t0, dest)
    import pandas as pd

    trials = pd.read_csv(results / "trials.csv")
    ok = trials[trials["status"] == "TERMINATED"]
    cols = ["trial_id", "backbone", "crop_margin", "lr", "cam_loss", "balance", "ft_epochs", "epochs_run",
            "best_balanced_accuracy", "best_auc", "best_worst_group_accuracy", f"best_{RECALL}",
            "best_within_group_auc", "best_lung_mass", "best_edge_mass", "best_objective"]
    s["all_trials"] = ok[[c for c in cols if c in ok]].to_dict("records")
    return s


# ------------------------------------------------------------------------------ tables

def reached(summary: dict) -> list[str]:
    """Arms / sweep trials with worst_group_accuracy ≥ 0.5 at CV balanced accuracy ≥ 0.90."""
    hits = []
    for a in summary.get("arms", []):
        if _ge(a.get("worst_group_accuracy"), 0.5) and _ge(a.get("balanced_accuracy"), 0.9):
            hits.append(f"arm {arm_name(a)}")
    for t in (summary.get("sweep") or {}).get("all_trials", []):
        if _ge(t.get("best_worst_group_accuracy"), 0.5) and _ge(t.get("best_balanced_accuracy"), 0.9):
            hits.append(f"sweep trial {t['trial_id']}")
    return hits


def _ge(v: object, bound: float) -> bool:
    try:
        return float(v) >= bound  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def arm_name(a: dict) -> str:
    stage = f"ft {a['ft_epochs']} ep × {a['ft_blocks']} blocks" if a.get("ft_epochs") else "head only"
    return f"cam_loss {a['cam_loss']:g} · {a['balance']} · {stage}"


def levers_markdown(s: dict) -> str:
    lines = ["# Training levers on cxr-real (`benchmarks/levers_real.py`)", "",
             (f"Command: `{s['command']}` · data `{s['data']}` · task {s['task']} · {s['cpus']} CPU cores (shared) · "
             f"wall {s.get('wall_s', s['arms_wall_s']) / 60:.1f} min (arms {s['arms_wall_s'] / 60:.1f} min)."), "",
             (f"## The 8 arms (efficientnet_lite0, crop 0.08, {s['input_size']} px, {s['folds']}-fold patient-grouped "
             f"CV, {s['epochs']} head epochs, holdout {s['holdout']})"), "",
             ("One trial each, same folds and features; values at the arm's **last** epoch (fine-tuned: after "
             f"{s['ft_epochs']} ft epochs of the last {s['ft_blocks']} blocks, restored to the best ft epoch by "
             f"inner-split loss). Cells: `{s['adult_non_covid_cell']}` is the adult non-COVID cell; "
             "worst_group_acc. is the lowest recall over (source × class) cells; within-group AUC is COVID vs "
             "rest inside ieee8023."), "",
             ("| arm | CV bal. acc. | CV AUC | worst_group_acc. | ieee8023 × rest recall | ieee8023 × covid recall "
             "| within-group AUC | lung_mass | edge_mass | s / trial |"), "|---" * 10 + "|"]
    for a in s["arms"]:
        if "error" in a:
            lines.append(f"| {arm_name(a)} | failed: {a['error']} |" + " |" * 8)
            continue
        lines.append(f"| {arm_name(a)} | {f(a['balanced_accuracy'])} | {f(a['auc'])} "
                     f"| {f(a['worst_group_accuracy'])} | {f(a[RECALL])} | {f(a.get(COVID_RECALL))} "
                     f"| {f(a['within_group_auc'])} "
                     f"| {f(a['lung_mass'])} | {f(a['edge_mass'])} | {f(a['trial_s'], '.0f')} |")
    sw = s.get("sweep")
    if sw:
        lines += ["", (f"## The sweep of `{s['space']}` ({sw['trials']} trials, {sw['stopped_early']} stopped early "
                      f"by ASHA, wall {sw['wall_s'] / 60:.1f} min; objective {sw['metric']} + w·focus)"), "",
                  (f"Held out: {sw['heldout']['patients']} patients / {sw['heldout']['images']} images, never seen by "
                  "the search; test = model refit on all search images, scored there."), "",
                  ("| role | trial | config | CV bal. acc. | CV AUC | worst_group_acc. | ieee8023 × rest recall "
                  "(CV / test) | within-group AUC (CV / test) | test bal. acc. | lung_mass | edge_mass |"),
                  "|---" * 11 + "|"]
        for role, r in sw["roles"].items():
            cfg = r["config"]
            conf = ", ".join(f"{k} {cfg[k]}" for k in ("backbone", "crop_margin", "cam_loss", "balance", "ft_epochs")
                             if k in cfg)
            lines.append(f"| {role} | {r['trial_id']} | {conf} | {f(r['cv_balanced_accuracy'])} | {f(r['cv_auc'])} "
                         f"| {f(r['worst_group_accuracy'])} | {f(r['adult_non_covid_recall'])} / "
                         f"{f(r['test_adult_non_covid_recall'])} | {f(r['within_group_auc'])} / "
                         f"{f(r['test_within_group_auc'])} | {f(r['test_balanced_accuracy'])} "
                         f"| {f(r['lung_mass'])} | {f(r['edge_mass'])} |")
        lines += ["", "Every finished trial of the sweep (best-objective epoch):", "",
                  ("| trial | backbone | crop | cam_loss | balance | ft_epochs | epochs run | CV bal. acc. "
                  "| worst_group_acc. | within-group AUC | lung_mass | edge_mass |"), "|---" * 12 + "|"]
        for t in sw["all_trials"]:
            lines.append(f"| {t['trial_id']} | {t['backbone']} | {t['crop_margin']} | {t['cam_loss']} "
                         f"| {t['balance']} | {t['ft_epochs']} | {t['epochs_run']} | {f(t['best_balanced_accuracy'])} "
                         f"| {f(t['best_worst_group_accuracy'])} | {f(t['best_within_group_auc'])} "
                         f"| {f(t['best_lung_mass'])} | {f(t['best_edge_mass'])} |")
    hits = s["reached_target"]
    lines += ["", "Target (issue 15): worst_group_accuracy ≥ 0.5 at CV balanced accuracy ≥ 0.90 — "
              + (f"reached by {', '.join(hits)}." if hits else "**not reached** by any arm or sweep trial."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

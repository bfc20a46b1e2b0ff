"""Real-data benchmark: CPU-sized cxrtune sweeps on cxr-real, with a held-out test split.

For each task (`covid_vs_rest`, `three_class`) it runs one real sweep (`search.sweep.run_sweep`:
OptunaSearch + ASHA, patient-grouped 4-fold CV, Grad-CAM lung/edge mass in the objective) from
spaces/balvinsson2020-cpu.yaml with `holdout` patients that the search never sees, then compares
the **metric-best** trial (what a search on balanced accuracy alone picks) with the **selected**
one (the most lung-focused within Δ of it) and the objective-best one: CV metrics, held-out
metrics, lung/edge mass, and the group metrics that expose the source shortcut of cxr-real (every
COVID image is an adult from ieee8023, every normal a child from Kermany): worst-group accuracy,
the recall on the adult non-COVID cell (`ieee8023 × rest`), within-group AUC.

Writes to `results/example-real/` (committed): `summary.md` (the tables), `summary.json`, per task
`<task>/trials.csv`, `leaderboard.md`, `test_metrics.json` (no per-image rows), `heldout.json`
(held-out patient ids), and plots that are not patient images (metric vs lung mass of all trials,
learning curves, the ASHA view). The sweeps themselves — models, Grad-CAM montages of real
patients, report.html — go to `results/example-real/sweeps/`, which that directory's .gitignore
keeps out of git.

    python benchmarks/real_cxr.py                       # both tasks, ≈ 15–25 min on 2 shared cores
    python benchmarks/real_cxr.py --tasks covid_vs_rest --num-samples 6 --epochs 6   # shorter

Exits 0 with a message when the data is absent.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download weights in a benchmark
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cxr-real"
DEFAULT_OUT = ROOT / "results" / "example-real"
BASE_SPACE = ROOT / "spaces" / "balvinsson2020-cpu.yaml"
ADULT_NON_COVID = {"covid_vs_rest": ("ieee8023", "rest"), "three_class": ("ieee8023", "pneumonia")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--tasks", nargs="+", default=["covid_vs_rest", "three_class"],
                    choices=["covid_vs_rest", "three_class"])
    ap.add_argument("--num-samples", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    data = Path(args.data)
    if not (data / "manifest.csv").is_file():
        print(f"skipped: no cxr-real data at {data} (manifest.csv not found)")
        return 0

    import ray
    import yaml

    from search.space import SweepSpec
    from search.sweep import run_sweep, start_ray

    out = Path(args.out).resolve()
    sweeps = out / "sweeps"
    sweeps.mkdir(parents=True, exist_ok=True)
    ignore_sweeps(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    start_ray(None, print)
    summary: dict = {"data": str(data), "base_space": BASE_SPACE.name, "command": " ".join(["python", *sys.argv]),
                     "cpus": os.cpu_count(), "tasks": {}}
    try:
        for task in args.tasks:
            raw = yaml.safe_load(BASE_SPACE.read_text())
            raw.update(name=f"real-{task}", task=task, num_samples=args.num_samples, epochs=args.epochs,
                       holdout=args.holdout, seed=args.seed)
            raw["asha"]["grace_period"] = min(raw["asha"]["grace_period"], args.epochs)
            raw["data"] = {"path": str(data)}
            spec = SweepSpec.model_validate(raw)
            space_file = sweeps / f"real-{task}-{stamp}.yaml"
            space_file.write_text(yaml.safe_dump(raw, sort_keys=False))
            print(f"\n=== {task}: {args.num_samples} trials × ≤{args.epochs} epochs, holdout {args.holdout} ===")
            t0 = time.time()
            results = run_sweep(spec, space_file=space_file, data=str(data), out=sweeps,
                                name=f"{task}-{stamp}", log=print)
            wall = time.time() - t0
            summary["tasks"][task] = task_summary(results, spec, wall, out / task)
    finally:
        ray.shutdown()
    md = summary_markdown(summary)
    (out / "summary.md").write_text(md)
    (out / "summary.json").write_text(json.dumps(plain(summary), indent=1, allow_nan=False))
    print("\n" + md)
    print(f"written: {out}/summary.md, summary.json, <task>/ (sweeps with models and montages: {sweeps}, git-ignored)")
    return 0


def ignore_sweeps(out: Path) -> None:
    """A .gitignore in `out` that keeps sweeps/ (models, montages of real patients) out of git."""
    path = out / ".gitignore"
    if not path.exists():
        path.write_text("# the sweeps (models, Grad-CAM montages of real patients, report.html) stay out of git\n"
                        "sweeps/\n")


# ------------------------------------------------------------------------------ one task

def task_summary(results: Path, spec, wall_s: float, dest: Path) -> dict:
    """Export the metric-best model too, score it on the held-out patients, and collect the rows."""
    import pandas as pd

    from search.outputs.heldout import score_model, search_split
    from search.outputs.select import local_prepared, metric_best, metric_peak, trial_config
    from search.rundir import load_record, read_history, read_trials, sweep_dataset
    from trainable.export import export_model

    trials, history = read_trials(results), read_history(results)
    confusion = json.loads((results / "confusion.json").read_text())
    selection = json.loads((results / "selection.json").read_text())
    test = json.loads((results / "test_metrics.json").read_text())
    saved = load_record(results)
    split = search_split(spec, sweep_dataset(saved, spec))
    metric = spec.objective.metric
    mb = metric_best(trials, metric)
    # metric-best is chosen on its metric's own best epoch: its row and its exported model are that
    # epoch's (history.csv), not the epoch where its objective peaked
    peak = metric_peak(history, mb["trial_id"], metric)
    mb_epoch = int(peak["epoch"]) if peak is not None else int(mb["best_epoch"])
    roles = {"metric-best": mb["trial_id"], "selected": selection["selected"],
             "objective-best": selection["objective_best"]}
    held = {"selected": test.get("selected"), "objective-best": test.get("best")}
    if mb["trial_id"] == roles["selected"]:
        held["metric-best"] = held["selected"]
    elif mb["trial_id"] == roles["objective-best"]:
        held["metric-best"] = held["objective-best"]
    else:  # export it the way best/ and selected/ are, then score it the same way
        metrics = {k.removeprefix("best_"): float(mb[k]) for k in mb.index
                   if k.startswith("best_") and k != "best_epoch" and pd.notna(mb[k])}
        prepared = local_prepared(results, spec, saved, [mb], print)
        export_model(results / "metric_best", trial_config(mb, spec), prepared, mb_epoch,
                     metrics | {"trial_id": mb["trial_id"]})
        held["metric-best"] = score_model(results / "metric_best", split, spec, print)
    classes = confusion[next(iter(confusion))]["classes"] if confusion else []
    group, cell_class = ADULT_NON_COVID[spec.task]
    rows = {}
    for role, tid in roles.items():
        r = trials[trials["trial_id"] == tid].iloc[0]
        h = held.get(role) or {}
        hm = h.get("metrics", {})
        rows[role] = {
            "trial_id": tid, "backbone": r.get("backbone"), "config": {k: plain(r[k]) for k in spec.space if k in r},
            "cv_balanced_accuracy": r.get("best_balanced_accuracy"), "cv_auc": r.get("best_auc"),
            "cv_covid_recall": _recall(confusion.get(tid), "covid"),
            "test_balanced_accuracy": hm.get("balanced_accuracy"), "test_auc": hm.get("auc"),
            "test_covid_recall": (h.get("per_class", {}).get("covid") or {}).get("recall"),
            "lung_mass": r.get("best_lung_mass"), "edge_mass": r.get("best_edge_mass"),
            "lung_enrichment": r.get("best_lung_enrichment"),
            "worst_group_accuracy": r.get("best_worst_group_accuracy"),
            "adult_non_covid_recall": r.get(f"best_recall_{group}_{cell_class}"),
            "within_group_auc": r.get("best_within_group_auc"),
            "epoch": int(r["best_epoch"]),
            "test_lung_mass": hm.get("lung_mass"), "test_edge_mass": hm.get("edge_mass"),
            "test_worst_group_accuracy": hm.get("worst_group_accuracy"),
            "test_adult_non_covid_recall": (h.get("group_recall") or {}).get(f"recall_{group}_{cell_class}"),
            "test_adult_non_covid_images": (h.get("group_cells") or {}).get(f"{group}|{cell_class}"),
            "test_within_group_auc": hm.get("within_group_auc"),
        }
    if peak is not None:  # metric-best's CV figures at its metric's own best epoch
        at_peak = {"cv_balanced_accuracy": "balanced_accuracy", "cv_auc": "auc", "lung_mass": "lung_mass",
                   "edge_mass": "edge_mass", "lung_enrichment": "lung_enrichment",
                   "worst_group_accuracy": "worst_group_accuracy", "within_group_auc": "within_group_auc",
                   "adult_non_covid_recall": f"recall_{group}_{cell_class}"}
        rows["metric-best"].update({k: plain(peak[c]) for k, c in at_peak.items() if c in peak.index},
                                   epoch=mb_epoch)
        if mb_epoch != int(mb["best_epoch"]):  # confusion.json holds the objective-best epoch's matrix
            rows["metric-best"]["cv_covid_recall"] = None
    ok = trials[trials["status"] == "TERMINATED"].copy()
    trial_wall = history.groupby("trial_id")["time_total_s"].max() if "time_total_s" in history else None
    per_backbone = {}
    for backbone, g in ok.groupby("backbone"):
        top = g.loc[g[f"best_{metric}"].idxmax()]
        walls = trial_wall.reindex(g["trial_id"]).dropna() if trial_wall is not None else pd.Series(dtype=float)
        per_backbone[backbone] = {
            "trials": int(len(g)), "trial_id": top["trial_id"],
            "cv_balanced_accuracy": top.get("best_balanced_accuracy"), "cv_auc": top.get("best_auc"),
            "cv_covid_recall": _recall(confusion.get(top["trial_id"]), "covid"),
            "lung_mass": top.get("best_lung_mass"), "edge_mass": top.get("best_edge_mass"),
            "mean_trial_wall_s": float(walls.mean()) if len(walls) else None,
            "epochs_run_mean": float(g["epochs_run"].mean())}
    dest.mkdir(parents=True, exist_ok=True)
    _copy_files(results, dest, test, held.get("metric-best"))
    _plots(results, trials, history, metric, roles, dest)
    sweep_summary = json.loads((results / "summary.json").read_text())
    return {"results": str(results), "wall_s": round(wall_s, 1), "metric": metric, "classes": classes,
            "trials": int(len(trials)), "finished": int(len(ok)), "stopped_early": int(ok["stopped_early"].sum()),
            "images": sweep_summary["data"]["images"], "heldout": test["heldout"]["heldout"],
            "holdout": test["heldout"]["fraction"], "adult_non_covid_cell": f"{group} × {cell_class}",
            "roles": rows, "per_backbone": per_backbone, "timings": sweep_summary.get("timings", {})}


def _recall(entry: dict | None, cls: str) -> float | None:
    if not entry or cls not in entry["classes"]:
        return None
    k = entry["classes"].index(cls)
    row = entry["matrix"][k]
    return float(row[k] / sum(row)) if sum(row) else None


def _copy_files(results: Path, dest: Path, test: dict, metric_best_held: dict | None) -> None:
    """The committed, image-free part of a sweep: tables and the held-out ids and scores."""
    for name in ("trials.csv", "leaderboard.md", "heldout.json", "selection.json"):
        shutil.copy2(results / name, dest / name)
    slim = {k: ({kk: vv for kk, vv in v.items() if kk != "per_image"} if isinstance(v, dict) and k != "heldout"
                else v) for k, v in test.items()}
    if metric_best_held is not None:
        slim["metric_best"] = {k: v for k, v in metric_best_held.items() if k != "per_image"}
    (dest / "test_metrics.json").write_text(json.dumps(plain(slim), indent=1, allow_nan=False))


def _plots(results: Path, trials, history, metric: str, roles: dict, dest: Path) -> None:
    """Metric vs lung mass of every trial (Pareto front, roles marked), the ASHA view, learning curves."""
    from search.report import plots
    from search.report.html import asha_rungs, pareto_front

    spec = json.loads((results / "space.json").read_text())["spec"]
    ok = trials[trials["status"] == "TERMINATED"].dropna(subset=[f"best_{metric}", "best_lung_mass"])
    front = pareto_front(ok[f"best_{metric}"].to_numpy(float), ok["best_lung_mass"].to_numpy(float))
    (dest / "metric_vs_lung_mass.png").write_bytes(plots.tradeoff_plot(ok, metric, front, roles))
    rungs = asha_rungs(spec["asha"]["grace_period"], spec["asha"]["reduction_factor"], spec["epochs"])
    (dest / "asha.png").write_bytes(plots.asha_plot(trials, history, spec["epochs"], rungs))
    for role in ("metric-best", "selected"):
        r = trials[trials["trial_id"] == roles[role]].iloc[0]
        (dest / f"curves_{role}.png").write_bytes(
            plots.curves_plot(history, roles[role], metric, float(r.get("best_epoch", math.nan))))


# ------------------------------------------------------------------------------ tables

def summary_markdown(summary: dict) -> str:
    lines = ["# cxr-real benchmark (`benchmarks/real_cxr.py`)", "",
             f"Command: `{summary['command']}` · data `{summary['data']}` · base space `{summary['base_space']}` "
             f"· {summary['cpus']} CPU cores (shared).", ""]
    for task, t in summary["tasks"].items():
        h = t["heldout"]
        lines += [f"## {task}", "",
                  f"{t['trials']} trials ({t['stopped_early']} stopped early by ASHA, {t['trials'] - t['finished']} "
                  f"failed), wall {t['wall_s'] / 60:.1f} min; search on {t['images']} images; held out "
                  f"(holdout {t['holdout']}): {h['patients']} patients / {h['images']} images, never seen by the "
                  f"search. CV = 4-fold patient-grouped out-of-fold value at the epoch shown (the trial's best "
                  f"objective epoch; metric-best's: its metric's own best epoch); test = the "
                  f"held-out patients (model refit on all search images). Adult non-COVID cell: "
                  f"`{t['adult_non_covid_cell']}`.", "",
                  "| model | trial | backbone | epoch | CV bal. acc. | CV AUC | CV COVID recall | test bal. acc. | test AUC "
                  "| test COVID recall | lung_mass | edge_mass | lung_enrichment | worst_group_acc. "
                  "| adult non-COVID recall (CV / test) | within-group AUC (CV / test) |",
                  "|---" * 16 + "|"]
        for role, r in t["roles"].items():
            n = r.get("test_adult_non_covid_images")
            lines.append(
                f"| {role} | {r['trial_id']} | {r['backbone']} | {r.get('epoch', '—')} | {fmt_value(r['cv_balanced_accuracy'])} | {fmt_value(r['cv_auc'])} "
                f"| {fmt_value(r['cv_covid_recall'])} | {fmt_value(r['test_balanced_accuracy'])} | {fmt_value(r['test_auc'])} "
                f"| {fmt_value(r['test_covid_recall'])} | {fmt_value(r['lung_mass'])} | {fmt_value(r['edge_mass'])} "
                f"| {fmt_value(r['lung_enrichment'], '.2f')} | {fmt_value(r['worst_group_accuracy'])} "
                f"| {fmt_value(r['adult_non_covid_recall'])} / {fmt_value(r['test_adult_non_covid_recall'])}"
                f"{f' (n={n})' if n else ''} | {fmt_value(r['within_group_auc'])} / {fmt_value(r['test_within_group_auc'])} |")
        lines += ["", "Per backbone (its best trial on CV balanced accuracy; wall = mean trial time):", "",
                  "| backbone | trials | mean epochs | best CV bal. acc. | CV AUC | CV COVID recall | lung_mass "
                  "| edge_mass | mean trial wall s |", "|---" * 9 + "|"]
        for b, r in t["per_backbone"].items():
            lines.append(f"| {b} | {r['trials']} | {r['epochs_run_mean']:.1f} | {fmt_value(r['cv_balanced_accuracy'])} "
                         f"| {fmt_value(r['cv_auc'])} | {fmt_value(r['cv_covid_recall'])} | {fmt_value(r['lung_mass'])} "
                         f"| {fmt_value(r['edge_mass'])} | {fmt_value(r['mean_trial_wall_s'], '.1f')} |")
        tm = t.get("timings", {})
        lines += ["", f"Decode {tm.get('decode_s', float('nan')):.0f} s, features "
                      f"{tm.get('features_s', float('nan')):.0f} s (feature cache hits: "
                      f"{int(tm.get('feature_cache_hits', 0))}). Plots: `{task}/metric_vs_lung_mass.png`, "
                      f"`{task}/asha.png`, `{task}/curves_metric-best.png`, `{task}/curves_selected.png`.", ""]
    return "\n".join(lines) + "\n"


def fmt_value(v: object, fmt: str = ".3f") -> str:
    """`v` formatted, or — when it is missing or not finite (shared with levers_real.py)."""
    try:
        v = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "—"
    return "—" if not math.isfinite(v) else format(v, fmt)


def plain(o: object) -> object:
    """`o` as plain JSON values (numpy scalars unwrapped, NaN → None)."""
    import numpy as np

    if isinstance(o, dict):
        return {str(k): plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [plain(v) for v in o]
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


if __name__ == "__main__":
    sys.exit(main())

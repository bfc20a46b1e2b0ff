"""`cxrtune report RESULTS_DIR`: one self-contained `report.html` that people look at to decide.

It reads only the files a sweep leaves (trials.csv, history.csv, summary.json, space.json, best/,
and, when present, selected/, selection.json, confusion.json, the Grad-CAM montages, hardware.json)
and writes a single HTML file: every figure is an embedded PNG, the table sorts with a few lines of
inline JavaScript, and nothing is fetched from the network, so the file opens offline and can be
mailed or archived as it is. What the results directory lacks is said in plain words, never drawn.

Sections: summary → leaderboard → metric-vs-lung-focus scatter with the Pareto front → ASHA view
(objective per epoch, stopped trials cut) → Grad-CAM montages → the top models' confusion matrices
and training/validation curves.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from search.objective import pareto_front  # noqa: F401 - the front is computed there; re-exported
from search.report import plots
from search.report.heldout_section import section_heldout
from search.rundir import read_history, read_json, read_trials
from trainable.atomic import atomic_write_text
from trainable.errors import CxrtuneError

TOP_MODELS = 3


class ReportError(CxrtuneError):
    """The directory is not a sweep's results (the CLI prints this on one line, exit 2)."""


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The epochs at which ASHA compares trials (Ray's milestones grace·rf^k), below max_t."""
    if max_t <= grace_period or reduction_factor <= 1:
        return []
    n = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return sorted({int(grace_period * reduction_factor ** k) for k in range(n)} - {max_t})


@dataclass
class Sweep:
    """Everything the report reads from one results directory."""

    root: Path
    trials: pd.DataFrame
    history: pd.DataFrame
    summary: dict
    space: dict
    metric: str
    roles: dict[str, str] = field(default_factory=dict)  # role → trial id
    selection: dict = field(default_factory=dict)
    confusion: dict | None = None
    hardware: dict = field(default_factory=dict)

    @property
    def finished(self) -> pd.DataFrame:
        return self.trials[self.trials["status"] == "TERMINATED"]


def load_sweep(results: Path) -> Sweep:
    """What the report shows, from the files alone (`search.rundir`'s readers); optional pieces
    that are missing stay empty and are said in words, never drawn."""
    results = Path(results)
    if not (results / "trials.csv").is_file():
        raise ReportError(f"{results} is not a sweep's results directory (no trials.csv)")
    trials, history = read_trials(results), read_history(results)
    summary, space = read_json(results / "summary.json"), read_json(results / "space.json")
    metric = (summary.get("objective") or space.get("spec", {}).get("objective") or {}).get("metric")
    metric = metric or "balanced_accuracy"
    for col in ("status", "stopped_early", "epochs_run", f"best_{metric}", "best_lung_mass",
                "best_edge_mass", "best_objective"):
        if col not in trials:
            trials[col] = {"status": "ERROR", "stopped_early": False}.get(col, np.nan)
    trials["stopped_early"] = trials["stopped_early"].astype(str).str.lower().eq("true")
    sweep = Sweep(results, trials, history, summary, space, metric,
                  selection=read_json(results / "selection.json"),
                  confusion=read_json(results / "confusion.json") if (results / "confusion.json").is_file() else None,
                  hardware=summary.get("hardware") or read_json(results / "hardware.json"))
    sweep.roles = _roles(sweep)
    return sweep


def _roles(s: Sweep) -> dict[str, str]:
    """objective-best (best/), metric-best, selected (selected/): where each is recorded."""
    roles: dict[str, str] = {}
    ok = s.finished.dropna(subset=["best_objective"])
    best_meta = read_json(s.root / "best" / "metadata.json").get("cv_metrics", {})
    best = best_meta.get("trial_id") or s.selection.get("objective_best") or s.summary.get("best_trial")
    if not best and len(ok):
        best = ok.loc[ok["best_objective"].idxmax(), "trial_id"]
    if best:
        roles["objective-best"] = str(best)
    col = f"best_{s.metric}"
    if ok[col].notna().any():
        roles["metric-best"] = str(ok.loc[ok[col].idxmax(), "trial_id"])
    selected = (read_json(s.root / "selected" / "metadata.json").get("cv_metrics", {}).get("trial_id")
                or s.selection.get("selected"))
    if selected:
        roles["selected"] = str(selected)
    return roles


def cluster_hardware() -> dict:
    """What ran the sweep: the Ray cluster's CPUs/GPUs/nodes when Ray is up, else this machine."""
    hw: dict = {"machine": platform.machine(), "system": platform.system(), "driver_cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            hw["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    try:
        import ray

        if ray.is_initialized():
            res = ray.cluster_resources()
            hw.update(cluster_cpus=int(res.get("CPU", 0)), cluster_gpus=float(res.get("GPU", 0)),
                      nodes=len([n for n in ray.nodes() if n.get("Alive")]))
    except Exception:  # noqa: BLE001 - hardware is informative; never fail a report for it
        pass
    try:
        import torch

        if torch.cuda.is_available():
            hw["gpu_names"] = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    except Exception:  # noqa: BLE001
        pass
    return hw


# ───────────────────────────────────────────── HTML ─────────────────────────────────────────────

def _e(v: object) -> str:
    return html.escape(str(v), quote=True)


def _num(v: object, fmt: str = ".3f") -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _e(v)
    return "—" if math.isnan(f) else format(f, fmt)


def _img(data: bytes, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _absent(text: str) -> str:
    return f'<p class="absent">{_e(text)}</p>'


def _searched(s: Sweep) -> list[str]:
    space = s.space.get("spec", {}).get("space", {})
    keys = [k for k, v in space.items() if isinstance(v, dict)] if space else []
    return [k for k in keys if k in s.trials]


def _metric_cell(metric: str, r: dict, role: str) -> str:
    """The card's metric at the trial's best (objective) epoch; metric-best, chosen on the metric's
    own best over its epochs, shows that peak beside it, so the card says why it was chosen."""
    cell = f'<dt>{_e(metric)}</dt><dd>{_num(r.get(f"best_{metric}"))}</dd>'
    peak = r.get(f"peak_{metric}")
    if role == "metric-best" and peak is not None and peak == peak:
        cell += f'<dt>{_e(metric)} (its own best epoch)</dt><dd>{_num(peak)}</dd>'
    return cell


def _row_of(s: Sweep, tid: str) -> pd.Series | None:
    hit = s.trials[s.trials["trial_id"].astype(str) == str(tid)]
    return None if hit.empty else hit.iloc[0]


def _roles_of(s: Sweep, tid: str) -> list[str]:
    return [role for role, t in s.roles.items() if t == str(tid)]


def _badges(roles: list[str]) -> str:
    return "".join(f'<span class="badge {r}">{_e(r)}</span>' for r in roles)


def section_summary(s: Sweep) -> str:
    sm, settings = s.summary, s.space.get("settings", {})
    ok = s.finished
    n = sm.get("trials", len(s.trials))
    stopped = sm.get("stopped_early", int(ok["stopped_early"].sum()))
    failed = sm.get("failed", int((s.trials["status"] != "TERMINATED").sum()))
    wall = sm.get("wall_s")
    cards = [("trials run", n), ("ran every epoch", len(ok) - int(ok["stopped_early"].sum())),
             ("stopped early by ASHA", stopped), ("failed", failed),
             ("wall time", _duration(wall) if wall is not None else "—")]
    stat = "".join(f'<div class="stat{" bad" if k == "failed" and v else ""}"><b>{_e(v)}</b><span>{_e(k)}</span></div>'
                   for k, v in cards)
    who = []
    pareto_mode = s.space.get("spec", {}).get("objective", {}).get("mode") == "pareto"
    explain = {"objective-best": ("Pareto-front member with the highest objective" if pareto_mode
                                  else "highest objective") + " — exported to best/",
               # `select` may have used another metric than the objective's (cxrtune select --metric)
               "selected": f"most lung-focused within Δ{' ' + str(s.selection['within']) if 'within' in s.selection else ''}"
                           f" of the best {s.selection.get('metric', s.metric)} — exported to selected/",
               "metric-best": f"highest {s.metric} alone (what a metric-only search picks)"}
    for role in ("objective-best", "selected", "metric-best"):
        tid = s.roles.get(role)
        r = _row_of(s, tid) if tid else None
        if r is None:
            body = ("not in this results directory (no selected/; run <code>cxrtune select RESULTS_DIR</code>)"
                    if role == "selected" else "no finished trial")
            who.append(f'<div class="role {role}"><h3>{_e(role)}</h3><p class="absent">{body}</p></div>')
            continue
        who.append(
            f'<div class="role {role}"><h3>{_e(role)} <code>{_e(tid)}</code></h3>'
            f'<p class="why">{_e(explain[role])}{_same_as(s, role)}</p><dl>'
            f'{_metric_cell(s.metric, r, role)}'
            f'<dt>focus</dt><dd>{_num(r.get("best_focus"))}</dd>'
            f'<dt>lung_mass</dt><dd>{_num(r.get("best_lung_mass"), ".1%")}</dd>'
            f'<dt>edge_mass</dt><dd>{_num(r.get("best_edge_mass"), ".1%")}</dd>'
            f'<dt>worst_group_accuracy</dt><dd>{_num(r.get("best_worst_group_accuracy"))}</dd>'
            f'<dt>within_group_auc</dt><dd>{_num(r.get("best_within_group_auc"))}</dd>'
            f'<dt>objective</dt><dd>{_num(r.get("best_objective"))}</dd></dl>'
            f'<p class="cfg">{_e(_config_text(s, r))}</p></div>')
    data = sm.get("data", {})
    obj = sm.get("objective") or s.space.get("spec", {}).get("objective", {})
    asha = s.space.get("spec", {}).get("asha", {})
    hw = s.hardware
    hardware = ", ".join(x for x in (
        f"{hw['cluster_cpus']} CPU" if "cluster_cpus" in hw else (f"{hw['driver_cpus']} CPU" if "driver_cpus" in hw else ""),
        f"{hw['cluster_gpus']:g} GPU" if hw.get("cluster_gpus") else "no GPU" if "cluster_gpus" in hw else "",
        f"{hw['nodes']} node(s)" if "nodes" in hw else "",
        " / ".join(hw.get("gpu_names", [])), hw.get("cpu_model", ""),
        hw.get("machine") or sm.get("machine", "")) if x)
    if hardware and not any(k in hw for k in ("cluster_cpus", "driver_cpus")):
        hardware += " (CPU and GPU counts not recorded: no hardware.json)"
    versions = ", ".join(f"{k} {v}" for k, v in (sm.get("versions") or {}).items())
    if sm.get("python"):
        versions = f"python {sm['python']}, " + versions
    timings = ", ".join(f"{k[:-2]} {float(v):.1f}s" if k.endswith("_s") else f"{k} {v:g}"
                        for k, v in (sm.get("timings") or {}).items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool))
    details = [
        ("space file", f"<code>{_e(sm.get('space_file') or s.space.get('space_file', '—'))}</code>"),
        ("data", f"{_e(data.get('images', '—'))} images · classes {_e(', '.join(data.get('classes', [])) or '—')} · "
                 f"hash <code>{_e(data.get('hash', '—'))}</code><br><code>{_e(data.get('root') or s.space.get('data', ''))}</code>"),
        ("search space", _e(_space_text(s.space.get("spec", {}).get("space", {})))),
        ("objective", _e(_objective_text(obj))),
        ("CV and ASHA", _e(f"{settings.get('folds', '?')} patient-grouped folds, up to {settings.get('epochs', '?')} epochs, "
                           f"ASHA grace period {asha.get('grace_period', '?')}, reduction factor {asha.get('reduction_factor', '?')}")),
        ("hardware", _e(hardware) if hardware else _e("not recorded (no hardware.json in this results directory)")),
        ("versions", _e(versions or "not recorded")),
        ("time", _e(f"wall {_duration(wall)}" + (f" · {timings}" if timings else "")) if wall is not None else "—"),
    ]
    half = (len(details) + 1) // 2
    tables = "".join('<table class="details">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in part)
                     + "</table>" for part in (details[:half], details[half:]))
    return (f'<section id="summary"><div class="stats">{stat}</div>'
            f'<div class="roles">{"".join(who)}</div><div class="details2">{tables}</div></section>')


def _same_as(s: Sweep, role: str) -> str:
    order = ["objective-best", "selected", "metric-best"]
    same = [r for r in order[:order.index(role)] if s.roles.get(r) == s.roles.get(role)]
    return f" · <b>same trial as {_e(same[0])}</b>" if same else ""


def _duration(seconds: object) -> str:
    try:
        t = float(seconds)
    except (TypeError, ValueError):
        return "—"
    return f"{t:.0f} s" if t < 120 else f"{t / 60:.1f} min" if t < 7200 else f"{t / 3600:.1f} h"


def section_confounding(s: Sweep) -> str:
    """The data's label × group table and its warnings (space.json["confounding"]), on the first
    screen: Grad-CAM's lung/edge mass cannot see a shortcut inside the chest (source, age, scanner)."""
    lines = s.space.get("confounding")
    if not lines:
        return ('<section id="confounding"><h2>Confounding</h2><p class="absent">Not recorded for this sweep '
                '(sweeps before this report version, or data without the group column).</p></section>')
    warn = [ln for ln in lines if ln.startswith("warning")]
    table = [ln for ln in lines if not ln.startswith("warning")]
    return ('<section id="confounding"><h2>Confounding: label × group</h2>'
            + "".join(f'<p class="warn"><strong>{_e(w)}</strong></p>' for w in warn)
            + f'<pre>{_e(chr(10).join(table))}</pre><p class="note">Compare worst_group_accuracy and '
              f'within_group_auc (cards, leaderboard) with the pooled metric: a model can score well by '
              f'reading the group instead of the disease.</p></section>')


def _objective_text(obj: dict) -> str:
    if not obj:
        return "—"
    if obj.get("mode") == "constraint":
        return f"{obj.get('metric')} with lung_mass ≥ {obj.get('lung_floor')} (constraint mode)"
    return f"{obj.get('metric')} + {obj.get('w')} · focus (weighted mode; focus: 0 = a uniform map, 1 = the lung mask)"


def _space_text(space: dict) -> str:
    """`hidden ∈ {16, 32} · lr loguniform [0.001, 0.01] · backbone = efficientnet_lite0`, searched first."""
    if not space:
        return "not recorded (no space.json)"
    parts, fixed = [], []
    for k, v in space.items():
        if not isinstance(v, dict):
            fixed.append(f"{k} = {v}")
        elif "choice" in v:
            parts.append(f"{k} ∈ {{{', '.join(map(str, v['choice']))}}}")
        else:
            kind, bounds = next(iter(v.items()))
            parts.append(f"{k} {kind} [{', '.join(map(str, bounds))}]")
    return " · ".join(parts + fixed)


def _config_text(s: Sweep, r: pd.Series) -> str:
    keys = _searched(s) or [k for k in ("backbone", "hidden", "lr", "augment", "crop_margin") if k in r]
    return " · ".join(f"{k} {_short(r.get(k))}" for k in keys)


def _short(v: object) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{v:.3g}"
    return str(v)


def section_leaderboard(s: Sweep) -> str:
    searched = _searched(s)
    max_epochs = s.space.get("settings", {}).get("epochs")
    ranked = s.trials.sort_values("best_objective", ascending=False, na_position="last").reset_index(drop=True)
    head = (["#", "trial"] + searched + ["epochs", "outcome", s.metric, f"final {s.metric}", "focus", "lung_mass",
                                         "edge_mass", "lung_enrichment", "worst_group_accuracy", "within_group_auc",
                                         "objective"])
    text_cols = {"trial", "outcome"} | {k for k in searched if s.trials[k].dtype.kind not in "iuf"}
    ths = "".join(f'<th title="click to sort" data-sort="{"text" if h in text_cols else "num"}">'
                  f'{_e(h).replace("_", "_<wbr>")}</th>' for h in head)
    body = []
    for i, r in ranked.iterrows():
        ok = r["status"] == "TERMINATED"
        roles = _roles_of(s, r["trial_id"])
        badges = f'<span class="badges">{_badges(roles)}</span>' if roles else ""
        cells = [_td(i + 1, i + 1),
                 f'<td class="trial" data-v="{_e(r["trial_id"])}"><code>{_e(r["trial_id"])}</code>{badges}</td>']
        cells += [_td(_short(r.get(k)), r.get(k) if k not in text_cols else str(r.get(k))) for k in searched]
        epochs = int(r["epochs_run"]) if pd.notna(r.get("epochs_run")) else 0
        cells.append(_td(f"{epochs}/{max_epochs}" if max_epochs else epochs, epochs))
        if ok:
            by = "patience (every fold's ft early stopping)" if r.get("stopped_by") == "patience" else "ASHA"
            outcome = f"stopped by {by} at {epochs}" if r["stopped_early"] else "ran every epoch"
            cells.append(f'<td class="{"cut" if r["stopped_early"] else ""}">{_e(outcome)}</td>')
        else:
            err = str(r.get("error", "")) if pd.notna(r.get("error", "")) else ""
            cells.append(f'<td class="failed" title="{_e(err)}">failed ({_e(r["status"])})</td>')
        for col, fmt in ((f"best_{s.metric}", ".3f"), (f"final_{s.metric}", ".3f"), ("best_focus", ".3f"),
                         ("best_lung_mass", ".3f"), ("best_edge_mass", ".3f"), ("best_lung_enrichment", ".2f"),
                         ("best_worst_group_accuracy", ".3f"), ("best_within_group_auc", ".3f"),
                         ("best_objective", ".3f")):
            v = r.get(col, np.nan)
            cells.append(_td(_num(v, fmt), v))
        cls = " ".join(["lead"] if "objective-best" in roles else []) + (" failed-row" if not ok else "")
        body.append(f'<tr class="{cls.strip()}">{"".join(cells)}</tr>')
    n_fail = int((s.trials["status"] != "TERMINATED").sum())
    note = (f"{len(s.trials)} trials, values at the best epoch of each (a maximum over epochs: optimistic), "
            f"and the metric at the last epoch (final); sorted by objective. Click a column to sort."
            + (f" {n_fail} failed (hover over “failed” for the error)." if n_fail else ""))
    return (f'<section id="leaderboard"><h2>Leaderboard</h2><p class="note">{_e(note)}</p>'
            f'<div class="scroll"><table class="sortable" id="leaderboard-table"><thead><tr>{ths}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div></section>')


def _td(text: object, value: object) -> str:
    """A cell that sorts by `value`: a number (missing → -Infinity, last when descending) or a string."""
    if isinstance(value, str):
        key = value
    else:
        try:
            v = float(value)
            key = "-Infinity" if math.isnan(v) else repr(v)
        except (TypeError, ValueError):
            key = str(value)
    return f'<td data-v="{_e(key)}">{_e(text)}</td>'


def section_tradeoff(s: Sweep) -> str:
    x = "best_focus" if "best_focus" in s.finished else "best_lung_mass"  # sweeps from before `focus`
    ok = s.finished.dropna(subset=[f"best_{s.metric}", x]).reset_index(drop=True)
    if ok.empty:
        return '<section id="tradeoff"><h2>Accuracy vs lung focus</h2>' + _absent("No finished trial to plot.") + "</section>"
    # the front among the trials that ran every epoch, as trials.csv's `pareto` column has it
    front = (ok["pareto"].astype(str).str.lower().eq("true").to_numpy() if "pareto" in ok
             else pareto_front(ok[x], ok[f"best_{s.metric}"]))
    on = ", ".join(ok.loc[front].sort_values(x)["trial_id"].astype(str))
    name = x.removeprefix("best_")
    png = plots.tradeoff_plot(ok, s.metric, front, s.roles, x=x)
    return (f'<section id="tradeoff"><h2>Accuracy vs lung focus</h2>'
            f'<p class="note">Pareto front among the trials that ran every epoch (none is better on both '
            f'{_e(s.metric)} and {_e(name)}): <code>{_e(on)}</code>.{_e(_pareto_mode_note(s))}</p>'
            f'{_img(png, f"metric vs {name} scatter with the Pareto front")}</section>')


def _pareto_mode_note(s: Sweep) -> str:
    if s.space.get("spec", {}).get("objective", {}).get("mode") != "pareto":
        return ""
    return (f" Objective mode pareto: the searcher maximised {s.metric} and focus together, ASHA "
            f"stopped trials on the weighted objective, and best/ is the front member with the highest objective.")


def section_asha(s: Sweep) -> str:
    h = s.history
    if h.empty or "objective" not in h:
        return '<section id="asha"><h2>ASHA</h2>' + _absent("history.csv is absent or empty: no per-epoch curves.") + "</section>"
    spec = s.space.get("spec", {})
    # ASHA's max_t counts fine-tuning epochs too (they are reported like head epochs)
    epochs = int(max(s.space.get("settings", {}).get("epochs") or 0, h["epoch"].max()))
    if spec:
        from search.space import SweepSpec

        try:
            epochs = max(epochs, SweepSpec.model_validate(spec).total_epochs())
        except ValueError:  # a space.json of another version: the epochs the history shows
            pass
    asha = spec.get("asha", {})
    rungs = asha_rungs(int(asha.get("grace_period", 1)), float(asha.get("reduction_factor", 2)), epochs)
    png = plots.asha_plot(s.trials, h, epochs, rungs, s.roles.get("objective-best"))
    stopped = s.finished[s.finished["stopped_early"]]
    text = (f"{len(stopped)} of {len(s.finished)} finished trials were stopped early: "
            + ", ".join(f"{r.trial_id} after {int(r.epochs_run)}"
                        + (" (patience)" if getattr(r, "stopped_by", "") == "patience" else "")
                        for r in stopped.itertuples())
            if len(stopped) else "ASHA stopped no trial early.")
    return (f'<section id="asha"><h2>ASHA: which trials were stopped</h2><p class="note">{_e(text)}</p>'
            f'{_img(png, "objective per epoch for every trial")}</section>')


def section_gradcam(s: Sweep) -> str:
    figs = []
    for sub, role in (("best", "objective-best"), ("selected", "selected")):
        path = s.root / sub / "gradcam.png"
        tid = s.roles.get(role, "?")
        if path.is_file():
            figs.append(f'<figure><figcaption><b>{_e(sub)}/</b> — {_e(role)} trial <code>{_e(tid)}</code>'
                        f'{_badges(_roles_of(s, tid))}</figcaption>'
                        f'{_img(path.read_bytes(), f"Grad-CAM montage of {sub}/", "montage")}</figure>')
        else:
            why = "" if (s.root / sub).is_dir() else f" ({sub}/ itself is absent)"
            text = (f"{sub}/gradcam.png is not in this results directory{why}: no Grad-CAM montage to show "
                    f"for the {role} model. `cxrtune select RESULTS_DIR` writes it.")
            figs.append(f'<figure class="missing"><figcaption><b>{_e(sub)}/</b></figcaption>{_absent(text)}</figure>')
    comparison = s.root / "gradcam_comparison.png"
    extra = (f'<details><summary>All roles on the same validation images (gradcam_comparison.png)</summary>'
             f'{_img(comparison.read_bytes(), "Grad-CAM comparison of metric-best, selected and objective-best", "montage")}'
             f'</details>' if comparison.is_file() else "")
    return (f'<section id="gradcam"><h2>Grad-CAM: what the chosen models look at</h2>'
            f'<p class="note">Validation images, Grad-CAM of the true class. Green: lung mask; dashed: edge band '
            f'(markers and text live there).</p><div class="montages">{"".join(figs)}</div>{extra}</section>')


def _top_models(s: Sweep) -> list[str]:
    order = [s.roles[r] for r in ("objective-best", "selected", "metric-best") if r in s.roles]
    ranked = s.finished.sort_values("best_objective", ascending=False)["trial_id"].astype(str).tolist()
    out: list[str] = []
    for tid in order + ranked:
        if tid not in out and _row_of(s, tid) is not None and len(out) < max(TOP_MODELS, len(order)):
            out.append(tid)
    return out


def confusion_table(classes: list[str], matrix: list[list[float]]) -> str:
    """True classes in rows, predicted in columns; shading by the share of the row; recall per row."""
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(classes):
        return _absent(f"confusion matrix of shape {m.shape} does not match {len(classes)} classes")
    head = "".join(f"<th>{_e(c)}</th>" for c in classes)
    rows = []
    for i, c in enumerate(classes):
        total = m[i].sum()
        cells = []
        for j in range(len(classes)):
            share = m[i, j] / total if total else 0.0
            tone = "diag" if i == j else "off"
            count = f"{m[i, j]:.0f}" if float(m[i, j]).is_integer() else f"{m[i, j]:.3g}"
            cells.append(f'<td class="{tone}" style="--a:{share:.3f}">{count}<small>{share:.0%}</small></td>')
        recall = f"{m[i, i] / total:.1%}" if total else "—"
        rows.append(f'<tr><th>{_e(c)}</th>{"".join(cells)}<td class="recall">{recall}</td></tr>')
    return (f'<table class="confusion"><thead><tr><th>true ↓ / predicted →</th>{head}<th>recall</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def section_models(s: Sweep) -> str:
    tops = _top_models(s)
    if not tops:
        return '<section id="models"><h2>Top models</h2>' + _absent("No finished trial.") + "</section>"
    if s.confusion is None:
        head_note = _absent("confusion.json is not in this results directory, so no confusion matrices are shown "
                            "(sweeps written before confusion matrices were recorded lack it).")
    else:
        head_note = ""
    cards = []
    for tid in tops:
        r = _row_of(s, tid)
        if s.confusion is None:
            cm = ""
        elif str(tid) in s.confusion:
            c = s.confusion[str(tid)]
            cm = confusion_table(list(c.get("classes", [])), c.get("matrix", []))
        else:
            cm = _absent(f"confusion.json has no entry for trial {tid}.")
        has_curves = not s.history.empty and (s.history["trial_id"].astype(str) == str(tid)).any()
        best_epoch = pd.to_numeric(r.get("best_epoch"), errors="coerce")
        curves = (_img(plots.curves_plot(s.history, tid, s.metric, best_epoch),
                       f"training and validation curves of trial {tid}")
                  if has_curves else _absent(f"history.csv has no epochs for trial {tid}."))
        cards.append(
            f'<article class="model"><h3>trial <code>{_e(tid)}</code>{_badges(_roles_of(s, tid))}</h3>'
            f'<p class="cfg">{_e(_config_text(s, r))} · best epoch {_num(r.get("best_epoch"), ".0f")} of '
            f'{_num(r.get("epochs_run"), ".0f")}</p><div class="pair"><div>{cm}</div><div>{curves}</div></div></article>')
    return (f'<section id="models"><h2>Top models: confusion matrices and curves</h2>'
            f'<p class="note">Confusion matrices are the cross-validated validation predictions at each trial\'s '
            f'best epoch; curves are the CV means per epoch.</p>{head_note}{"".join(cards)}</section>')


CSS = """
:root{--fg:#1d2430;--mut:#5b6575;--line:#e3e7ee;--bg:#f6f8fb;--card:#fff;--blue:#0072B2;--orange:#E69F00;
--green:#009E73;--red:#D55E00}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
color:var(--fg);background:var(--bg)}
header{background:#14213d;color:#fff;padding:18px 24px 14px}header h1{margin:0;font-size:22px;font-weight:600}
header p{margin:4px 0 0;color:#c9d3e6;font-size:13px}
nav{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid var(--line);padding:8px 24px;
display:flex;gap:18px;font-size:13px}nav a{color:var(--blue);text-decoration:none}
main{padding:18px 24px 40px;max-width:1400px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:16px 18px;margin:0 0 18px}
h2{margin:0 0 8px;font-size:17px}h3{margin:0 0 6px;font-size:15px}
.note{color:var(--mut);margin:0 0 10px}.warn{color:#8b0000;background:#fdecea;border-left:3px solid #c62828;padding:4px 8px}.absent{color:#8a4b00;background:#fff6e5;border-left:3px solid var(--orange);
padding:6px 10px;margin:6px 0}
.stats{display:flex;flex-wrap:wrap;gap:10px;margin-bottom:14px}.stat{flex:1 1 120px;background:var(--bg);
border-radius:6px;padding:10px 14px}.stat b{display:block;font-size:24px}.stat span{color:var(--mut);font-size:12px}
.stat.bad b{color:var(--red)}
.roles{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:12px;margin-bottom:14px}
.role{border:1px solid var(--line);border-top:4px solid var(--blue);border-radius:6px;padding:10px 14px}
.role.objective-best{border-top-color:var(--red)}.role.selected{border-top-color:var(--green)}
.role.metric-best{border-top-color:var(--orange)}.role .why{color:var(--mut);font-size:12px;margin:0 0 6px}
.role dl{display:grid;grid-template-columns:repeat(4,auto);gap:0 12px;margin:0}.role dt{color:var(--mut);font-size:11px}
.role dd{margin:0;font-size:18px;font-weight:600;grid-row:2}.cfg{color:var(--mut);font-size:12px;margin:6px 0 0}
table{border-collapse:collapse}.details th{text-align:left;color:var(--mut);font-weight:500;padding:3px 16px 3px 0;
vertical-align:top;white-space:nowrap}.details td{padding:3px 0}
.scroll{overflow-x:auto}.sortable{width:100%;font-size:12px}.sortable th{cursor:pointer;user-select:none;
background:#eef2f7;text-align:left;padding:6px 5px;vertical-align:bottom;border-bottom:2px solid var(--line)}
.sortable th[data-dir=asc]::after{content:" ▲"}.sortable th[data-dir=desc]::after{content:" ▼"}
.sortable td{padding:5px 5px;border-bottom:1px solid var(--line);white-space:nowrap}
.sortable tr.lead td{background:#fff1ec;font-weight:600}.sortable tr.failed-row td{color:#999}
td.cut{color:#7a7a7a;font-style:italic}td.failed{color:var(--red);font-weight:600}
.badge{display:inline-block;white-space:nowrap;margin-left:6px;padding:0 6px;border-radius:9px;font-size:10px;font-weight:600;
color:#fff;vertical-align:1px}.badge.objective-best{background:var(--red)}.badge.selected{background:var(--green)}
.badge.metric-best{background:var(--orange)}.sortable .badges{display:block;line-height:1.2}
.sortable td.trial{white-space:normal;max-width:200px}.details2{display:grid;
grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:0 28px;align-items:start}
.sortable .badges .badge{margin:2px 4px 0 0}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:18px}.grid2 section{margin:0 0 18px}
img.plot{max-width:100%;height:auto;display:block}img.montage{max-width:100%;height:auto;display:block;
border:1px solid var(--line)}
.montages{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}.montages figure{margin:0}
figcaption{font-size:13px;color:var(--fg);margin:0 0 6px}details{margin-top:12px}summary{cursor:pointer;color:var(--blue)}
.model{border-top:1px solid var(--line);padding-top:12px;margin-top:12px}.pair{display:flex;
flex-wrap:wrap;gap:18px;align-items:flex-start}.pair>div:empty{display:none}
.confusion td,.confusion th{border:1px solid var(--line);padding:6px 10px;text-align:center}
.confusion thead th{background:#eef2f7;font-weight:500}.confusion tbody th{text-align:right;background:#eef2f7;font-weight:500}
.confusion td.diag{background:rgba(0,158,115,var(--a))}.confusion td.off{background:rgba(213,94,0,var(--a))}
.confusion small{display:block;color:#333;font-size:10px}.confusion td.recall{background:#fafafa;font-weight:600}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;background:#eef2f7;padding:1px 4px;border-radius:3px}
footer{color:var(--mut);font-size:12px;padding:0 24px 24px}
"""

SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var dir = th.dataset.dir === 'desc' ? 'asc' : 'desc';
      table.querySelectorAll('th').forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = dir;
      var num = th.dataset.sort === 'num';  // a column is numbers or text, never guessed per cell
      var key = function (row) {
        var v = row.cells[col].dataset.v;
        return num ? Number(v) : v;
      };
      var rows = Array.prototype.slice.call(table.tBodies[0].rows);
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        var c = num ? (x === y ? 0 : (x < y ? -1 : 1)) : x.localeCompare(y);
        return dir === 'asc' ? c : -c;
      });
      rows.forEach(function (r) { table.tBodies[0].appendChild(r); });
    });
  });
});
"""


def build_report(results: Path) -> str:
    """The report of a results directory as one HTML string (no file is written)."""
    s = load_sweep(results)
    name = s.summary.get("name") or s.root.name
    title = f"cxrtune report — {name}"
    best = s.roles.get("objective-best")
    r = _row_of(s, best) if best else None
    lead = (f"Objective-best trial {best}: {s.metric} {_num(r.get(f'best_{s.metric}'))}, "
            f"{_num(r.get('best_lung_mass'), '.0%')} of its Grad-CAM evidence on the lungs, "
            f"{_num(r.get('best_edge_mass'), '.0%')} on the image edges." if r is not None
            else "No trial finished.")
    nav = "".join(f'<a href="#{i}">{t}</a>' for i, t in (
        ("summary", "Summary"), ("heldout", "Held-out test"), ("leaderboard", "Leaderboard"),
        ("tradeoff", "Accuracy vs lung focus"),
        ("asha", "ASHA"), ("gradcam", "Grad-CAM"), ("models", "Top models")))
    body = "".join([
        section_summary(s), section_confounding(s), section_heldout(s.root), section_leaderboard(s),
        f'<div class="grid2">{section_tradeoff(s)}{section_asha(s)}</div>',
        section_gradcam(s), section_models(s)])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{_e(title)}</title><style>{CSS}</style></head><body>'
            f'<header><h1>{_e(title)}</h1><p>{_e(lead)}</p></header><nav>{nav}</nav><main>{body}</main>'
            f'<footer>Written by <code>cxrtune report</code> from {_e(s.root)} at '
            f'{_e(time.strftime("%Y-%m-%d %H:%M:%S"))}. Self-contained: every image is embedded.</footer>'
            f'<script>{SORT_JS}</script></body></html>\n')


def write_report(results: Path, out: Path | None = None, hardware: dict | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Write `results/report.html` (or `out`) atomically; `hardware` is saved to hardware.json first."""
    results = Path(results)
    if hardware:
        atomic_write_text(results / "hardware.json", json.dumps(hardware, indent=2))
    t0 = time.perf_counter()
    page = build_report(results)
    out = Path(out) if out else results / "report.html"
    atomic_write_text(out, page)
    log(f"report: {out} ({len(page) / 1e6:.1f} MB, {time.perf_counter() - t0:.1f}s)")
    return out



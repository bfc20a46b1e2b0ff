"""The report's figures, drawn with matplotlib's object API (Agg canvas, no pyplot state) as PNG bytes.

Each function takes plain tables (trials.csv / history.csv as DataFrames) and returns the PNG, so
the report embeds it as a data URI and a test can call it on a hand-made table.
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# colour-blind-safe (Okabe–Ito); grey for trials ASHA stopped
BLUE, ORANGE, GREEN, RED, PURPLE, SKY, YELLOW = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7",
                                                 "#56B4E9", "#F0E442")
GREY = "#9a9a9a"
MARKS = {  # role → (marker, colour, legend text)
    "metric-best": ("*", ORANGE, "metric-best"),
    "objective-best": ("D", RED, "objective-best (best/)"),
    "selected": ("s", GREEN, "selected (selected/)"),
}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(ax) -> None:
    ax.grid(True, color="#e6e6e6", lw=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=8)


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def tradeoff_plot(trials: pd.DataFrame, metric: str, front: np.ndarray, marks: dict[str, str],
                  x: str = "best_focus") -> bytes:
    """best_<metric> against `x` (best_focus), one point per finished trial, the Pareto front as a staircase.

    `front` is a boolean mask over `trials`' rows; `marks` maps a role in MARKS to a trial id.
    """
    xname = x
    x, y = trials[xname].to_numpy(float), trials[f"best_{metric}"].to_numpy(float)
    stopped = trials["stopped_early"].astype(bool).to_numpy()
    fig = _figure(6.4, 4.6)
    ax = fig.add_subplot()
    _style(ax)
    if front.any():
        order = np.argsort(x[front])
        fx, fy = x[front][order], y[front][order]
        ax.step(fx, fy, where="pre", color=BLUE, lw=1.4, alpha=0.6, zorder=1)
        ax.scatter(fx, fy, s=150, facecolors="none", edgecolors=BLUE, lw=1.2, zorder=2,
                   label="Pareto front")
    ax.scatter(x[~stopped], y[~stopped], s=34, color=BLUE, zorder=3, label="ran every epoch")
    ax.scatter(x[stopped], y[stopped], s=34, facecolors="white", edgecolors=GREY, lw=1.2, zorder=3,
               label="stopped early by ASHA")
    ids = trials["trial_id"].astype(str).to_numpy()
    for tid, xi, yi in zip(ids, x, y):
        ax.annotate(tid, (xi, yi), xytext=(4, 4), textcoords="offset points", fontsize=6.5, color="#555")
    for role, tid in marks.items():
        hit = ids == str(tid)
        if role in MARKS and hit.any():
            marker, colour, text = MARKS[role]
            ax.scatter(x[hit], y[hit], marker=marker, s=260 if marker == "*" else 120, facecolors="none"
                       if marker != "*" else colour, edgecolors=colour, lw=1.8, zorder=4, label=f"{text}: {tid}")
    ax.set_xlabel("focus — lung vs edge evidence, 0 = uniform map, 1 = the lung mask  →" if xname == "best_focus"
                  else "lung_mass — share of Grad-CAM evidence on the lungs  →", fontsize=9)
    ax.set_ylabel(f"{metric} (cross-validated)  →", fontsize=9)
    ax.set_title(f"{metric} vs lung focus (best epoch of each trial)", fontsize=10)
    ax.margins(0.12)
    fig.legend(fontsize=7, loc="outside lower center", ncol=3, frameon=False)
    return png(fig)


def asha_plot(trials: pd.DataFrame, history: pd.DataFrame, epochs: int, rungs: list[int],
              highlight: str | None = None) -> bytes:
    """Objective per epoch for every trial; trials ASHA stopped end in a grey × where they were cut."""
    fig = _figure(6.4, 4.6)
    ax = fig.add_subplot()
    _style(ax)
    for r in rungs:
        ax.axvline(r, color="#b8b8b8", ls=":", lw=1.4, zorder=0)
        ax.annotate(f"ASHA rung: epoch {r}", (r, 1), xycoords=("data", "axes fraction"), xytext=(3, -10),
                    textcoords="offset points", fontsize=7, color="#777")
    stopped_ids = set(trials.loc[trials["stopped_early"].astype(bool), "trial_id"].astype(str))
    palette = [BLUE, ORANGE, GREEN, RED, PURPLE, SKY]
    done = 0
    last_epoch = history.groupby(history["trial_id"].astype(str))["epoch"].max()
    crowd = last_epoch[last_epoch.index.isin(stopped_ids)].value_counts()  # stopped trials per epoch
    for tid, h in history.groupby(history["trial_id"].astype(str), sort=False):
        h = h.sort_values("epoch")
        ex, ey = h["epoch"].to_numpy(float), h["objective"].to_numpy(float)
        if tid in stopped_ids:
            ax.plot(ex, ey, color=GREY, lw=1.0, ls="--", alpha=0.9, zorder=1)
            ax.scatter(ex[-1:], ey[-1:], marker="x", s=46, color="#555", zorder=3)
            if crowd.get(h["epoch"].max(), 0) <= 3:  # name the cut trials unless they pile up
                ax.annotate(tid, (ex[-1], ey[-1]), xytext=(5, -3), textcoords="offset points", fontsize=6.5,
                            color="#777")
            continue
        colour = palette[done % len(palette)]
        done += 1
        lw = 2.6 if tid == highlight else 1.4
        ax.plot(ex, ey, color=colour, lw=lw, marker="o", ms=3, zorder=2, label=tid + (" (best)" if tid == highlight else ""))
    ax.plot([], [], color=GREY, ls="--", marker="x", label="stopped by ASHA (× = last epoch)")
    ax.set_xlim(0.7, max(epochs, 1) + 0.3)
    ax.set_xticks(range(1, max(epochs, 1) + 1, max(1, epochs // 12)))
    ax.margins(y=0.12)
    ax.set_xlabel("epoch (ASHA's time unit)", fontsize=9)
    ax.set_ylabel("objective (CV)", fontsize=9)
    ax.set_title("ASHA: objective per epoch, every trial", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    if len(labels) > 13:  # many trials: name the best and the stopped marker, not every line
        keep = [i for i, t in enumerate(labels) if "(best)" in t or "stopped" in t]
        handles, labels = [handles[i] for i in keep], [labels[i] for i in keep]
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncol=4, frameon=False)
    return png(fig)


def curves_plot(history: pd.DataFrame, trial_id: str, metric: str, best_epoch: float | None = None) -> bytes:
    """One trial's training/validation curves: losses on the left, metric and Grad-CAM masses on the right;
    a dotted line at the best epoch (the one its row in trials.csv reports)."""
    h = history[history["trial_id"].astype(str) == str(trial_id)].sort_values("epoch")
    e = h["epoch"].to_numpy(float)
    fig = _figure(6.4, 2.9)
    left, right = fig.subplots(1, 2)
    for ax in (left, right):
        _style(ax)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_xlim(0.5, max(e.max() if len(e) else 1, 1) + 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if best_epoch is not None and np.isfinite(best_epoch):
            ax.axvline(best_epoch, color="#888", ls=":", lw=1.2, label="best epoch" if ax is left else None)
        if "stage" in h and (h["stage"] == "ft").any():  # the fine-tuning epochs (trainable.train.finetune)
            first_ft = float(e[(h["stage"] == "ft").to_numpy()].min())
            ax.axvspan(first_ft - 0.5, e.max() + 0.5, color="#eee", zorder=0,
                       label="fine-tuning" if ax is left else None)
    for col, label, colour in (("train_loss", "training loss", ORANGE), ("loss", "validation loss", BLUE)):
        if col in h:
            left.plot(e, h[col], marker="o", ms=3, color=colour, label=label)
    left.set_title("loss", fontsize=9)
    for col, colour in ((metric, PURPLE), ("lung_mass", GREEN), ("edge_mass", RED)):
        if col in h:
            right.plot(e, h[col], marker="o", ms=3, color=colour, label=f"{col} (val)")
    right.set_ylim(0, 1.02)
    right.set_title("validation", fontsize=9)
    handles = [x for ax in (left, right) for x in zip(*ax.get_legend_handles_labels())]
    fig.legend([h_ for h_, _ in handles], [t for _, t in handles], fontsize=7, loc="outside lower center",
               ncol=3, frameon=False)
    return png(fig)

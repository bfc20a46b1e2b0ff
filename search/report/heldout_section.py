"""The held-out test scores (test_metrics.json, `search.outputs.heldout`) as markdown and as report.html's
section. Reads files only: no Ray, no model (the report must render anywhere)."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

ROLES = (("best", "objective-best"), ("selected", "selected"))
TABLE_METRICS = ("balanced_accuracy", "auc", "accuracy", "macro_f1", "lung_mass", "edge_mass",
                 "lung_enrichment", "worst_group_accuracy", "within_group_auc")


def heldout_markdown(out: dict) -> list[str]:
    """The held-out section of leaderboard.md: one row per exported model."""
    h = out["heldout"]
    lines = ["## Held-out test", "",
             f"{h['heldout']['patients']} patients / {h['heldout']['images']} images (holdout {h['fraction']}, "
             f"seed {h['seed']}, stratified by {' and '.join(h['stratified_by'])}; ids in heldout.json) "
             f"never seen by the search. CV = the trial's cross-validated value at its best epoch."
             + _scored_as(out), "",
             "| model | trial | " + " | ".join(f"CV {_short_name(m)}" for m in ("balanced_accuracy", "auc")) + " | "
             + " | ".join(f"test {_short_name(m)}" for m in TABLE_METRICS) + " |",
             "|---" * (4 + len(TABLE_METRICS)) + "|"]
    for role, name in ROLES:
        if role not in out:
            continue
        r = out[role]
        cv = [r["cv_metrics"].get(m) for m in ("balanced_accuracy", "auc")]
        lines.append(f"| {name} (`{role}/`) | {r['trial_id']} | " + " | ".join(_fmt(v) for v in cv) + " | "
                     + " | ".join(_fmt(r["metrics"].get(m)) for m in TABLE_METRICS) + " |")
    return lines


def _scored_as(out: dict) -> str:
    """How lung / edge mass were scored (test_metrics.json `scoring`: the sweep's layer and mask source;
    the grid is per model, as it depends on the backbone)."""
    scored = {role: out[role]["scoring"] for role, _ in ROLES if role in out and out[role].get("scoring")}
    if not scored:  # test_metrics.json written before the scoring was recorded
        return ""
    first = next(iter(scored.values()))
    grids = sorted({sc.get("cam_grid", "?") for sc in scored.values()})
    grid = grids[0] if len(grids) == 1 else ", ".join(f"{r} {sc.get('cam_grid', '?')}" for r, sc in scored.items())
    return (f" Grad-CAM lung / edge mass as CV scored them: layer {first.get('cam_layer', 'final')} "
            f"(grid {grid}), lung masks {first.get('lung_masks', 'auto')}.")


def _short_name(m: str) -> str:
    return {"balanced_accuracy": "bal. acc.", "auc": "AUC", "worst_group_accuracy": "worst-group acc.",
            "within_group_auc": "within-group AUC", "lung_enrichment": "lung enrich."}.get(m, m)


def _fmt(v: object) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{float(v):.3f}"


def section_heldout(results: Path) -> str:
    """report.html's held-out section (HTML), or a sentence when the sweep had no held-out split."""
    path = Path(results) / "test_metrics.json"
    if not path.is_file():
        return ('<section id="heldout"><h2>Held-out test</h2><p class="absent">No held-out test split '
                '(set <code>holdout</code> in the space file).</p></section>')
    out = json.loads(path.read_text())
    lines = heldout_markdown(out)
    head = [c.strip() for c in lines[4].strip("|").split("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[6:]]
    table = ("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr></thead><tbody>"
             + "".join("<tr>" + "".join(f"<td>{html.escape(c.replace('`', ''))}</td>" for c in r) + "</tr>"
                       for r in rows) + "</tbody></table>")
    cells = ""
    for role, name in ROLES:
        if role in out and out[role].get("group_recall"):
            n = out[role].get("group_cells", {})
            floor = out[role].get("min_cell")
            note = f" (worst-group acc. over the cells with n ≥ {floor})" if floor else ""
            cells += (f"<p>{html.escape(name)}: recall per (group × class) cell{html.escape(note)} — "
                      + ", ".join(f"{html.escape(k.removeprefix('recall_'))} {_fmt(v)}"
                                  + (f" (n={n[k]})" if k in n else "")
                                  for k, v in out[role]["group_recall"].items()) + "</p>")
    return f'<section id="heldout"><h2>Held-out test</h2><p>{html.escape(lines[2])}</p>{table}{cells}</section>'

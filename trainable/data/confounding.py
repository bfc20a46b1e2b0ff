"""Is the label predictable from where an image comes from? Label × group tables and plain warnings.

A data set assembled from several sources (or sites, scanners, views, age bands) can let a model
separate the classes by the source alone: in `cxr-real` every `normal` image is a Kermany
pediatric film and no `covid` image is. Lung-vs-edge Grad-CAM mass cannot see that shortcut,
because it lives inside the chest (anatomy, exposure, scanner). This module makes it visible
before any training: the label × group table, the classes that occur in one group only, and
Cramér's V (0 = label independent of group, 1 = group determines label).

>>> lines, info = confounding_report(load_dataset("../shared/data/cxr-real"))   # doctest: +SKIP
>>> info["single_group_classes"]                                                # doctest: +SKIP
{'covid': 'ieee8023', 'normal': 'kermany'}
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from trainable.errors import DataError

BLANK = "(blank)"
AGE_BANDS = ((0, 18, "0-17"), (18, 40, "18-39"), (40, 60, "40-59"), (60, 80, "60-79"),
             (80, math.inf, "80+"))
# Cramér's V → words (Cohen's conventions for a 2-column table, used as a rough guide)
STRENGTH = ((0.5, "strong"), (0.3, "moderate"), (0.1, "weak"), (0.0, "negligible"))


def group_values(table: pd.DataFrame, column: str) -> pd.Series:
    """The grouping column as stripped strings, "(blank)" where empty.

    `age_band` is derived from a numeric `age` column when the data has no `age_band` column.
    """
    if column not in table.columns:
        if column == "age_band" and "age" in table.columns:
            return table["age"].map(_age_band).rename("age_band")
        extra = ", age_band" if "age" in table.columns else ""
        raise DataError(f"group-by column {column!r} is not in the data; its columns are "
                        f"{', '.join(map(str, table.columns))}{extra}")
    values = table[column].astype(str).str.strip()
    return values.where(values != "", BLANK).rename(column)


def _age_band(age: object) -> str:
    try:
        years = float(str(age).strip())
    except ValueError:
        return BLANK
    if math.isnan(years) or years < 0:
        return BLANK
    return next(name for lo, hi, name in AGE_BANDS if lo <= years < hi)


def cramers_v(table: pd.DataFrame) -> tuple[float, float, int]:
    """(Cramér's V, chi², degrees of freedom) of a contingency table (no continuity correction)."""
    obs = table.to_numpy(dtype=np.float64)
    obs = obs[obs.sum(1) > 0][:, obs.sum(0) > 0]
    r, c = obs.shape
    if r < 2 or c < 2:
        return 0.0, 0.0, 0
    n = obs.sum()
    expected = obs.sum(1, keepdims=True) * obs.sum(0, keepdims=True) / n
    chi2 = float(((obs - expected) ** 2 / expected).sum())
    return math.sqrt(chi2 / (n * (min(r, c) - 1))), chi2, (r - 1) * (c - 1)


def strength(v: float) -> str:
    return next(word for bound, word in STRENGTH if v >= bound)


def confounding_report(dataset, column: str = "source") -> tuple[list[str], dict]:
    """Label × `column` table, classes found in one group only, Cramér's V, and warnings.

    `dataset` is a `trainable.data.dataset.Dataset` (its task's classes are the labels compared) or a
    manifest-shaped DataFrame with a `label` column. Returns printable lines and a JSON-ready dict.
    """
    if isinstance(dataset, pd.DataFrame):
        table = dataset
        labels = table["label"].astype(str)
        classes = sorted(labels.unique())
    else:
        table = dataset.table
        classes = list(dataset.classes)
        labels = pd.Series(np.asarray(dataset.classes, dtype=object)[dataset.labels], index=table.index)
    groups = group_values(table, column)
    ct = pd.crosstab(pd.Categorical(labels, categories=classes), groups)
    ct.index = [str(c) for c in ct.index]
    ct = ct[ct.sum(0).sort_values(ascending=False, kind="stable").index]
    group_names = [str(g) for g in ct.columns]
    info: dict = {"column": column, "n": int(len(table)), "classes": classes, "groups": group_names,
                  "table": {c: {g: int(ct.loc[c, g]) for g in group_names} for c in classes},
                  "single_group_classes": {}, "single_class_groups": {}, "cramers_v": 0.0,
                  "chi2": 0.0, "dof": 0, "strength": "negligible", "warnings": []}
    lines = [f"label × {column} ({len(group_names)} group(s)):", *_render(ct)]
    if len(group_names) < 2:
        note = (f"every image has the same {column} ({group_names[0]!r}): no confounding by "
                f"{column} can be measured in this data" if group_names else f"no {column} values")
        info["note"] = note
        return lines + [note], info
    v, chi2, dof = cramers_v(ct)
    info.update(cramers_v=round(v, 4), chi2=round(chi2, 3), dof=dof, strength=strength(v))
    present = ct > 0
    info["single_group_classes"] = {c: str(present.columns[present.loc[c]][0]) for c in classes
                                    if present.loc[c].sum() == 1}
    info["single_class_groups"] = {g: str(present.index[present[g]][0]) for g in group_names
                                   if present[g].sum() == 1 and ct[g].sum() > 0}
    warnings = _warnings(ct, column, info)
    info["warnings"] = warnings
    lines.append(f"Cramér's V (label, {column}) = {v:.2f}: {strength(v)} association")
    lines += [f"warning: {w}" for w in warnings]
    return lines, info


def _warnings(ct: pd.DataFrame, column: str, info: dict) -> list[str]:
    out: list[str] = []
    stated: set[frozenset[str]] = set()
    singles = sorted(info["single_group_classes"].items(), key=lambda cg: -int(ct.loc[cg[0]].sum()))
    for c, g in singles:
        absent = [d for d in ct.index if d != c and ct.loc[d, g] == 0 and ct.loc[d].sum() > 0
                  and frozenset((c, d)) not in stated]
        stated.update(frozenset((c, d)) for d in absent)
        if absent:
            names = _join(f"`{d}`" for d in absent)
            out.append(f"every `{c}` image {_from(column, g)} and no {names} image does: "
                       f"a model can separate `{c}` from {names} by {column} alone")
        else:
            share = ct.loc[c, g] / max(1, ct[g].sum())
            out.append(f"every `{c}` image {_from(column, g)} ({share:.0%} of the `{g}` images are "
                       f"`{c}`): {column} alone points to `{c}`")
    for g, c in info["single_class_groups"].items():
        if c not in info["single_group_classes"]:
            out.append(f"every `{g}` image is `{c}` ({ct.loc[c, g]} of {ct.loc[c].sum()} `{c}` images): "
                       f"{column} `{g}` alone predicts `{c}`")
    if info["cramers_v"] >= 0.3:
        out.append(f"label and {column} are {info['strength']}ly associated (Cramér's V "
                   f"{info['cramers_v']:.2f}): report results per {column} and compare classes "
                   f"within one {column}")
    return out


def _from(column: str, group: str) -> str:
    return f"comes from `{group}`" if column == "source" else f"has {column} `{group}`"


def _join(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _render(ct: pd.DataFrame) -> list[str]:
    """A fixed-width text table with row and column totals."""
    cols = [str(c) for c in ct.columns] + ["total"]
    rows = [[str(i), *[str(int(v)) for v in ct.loc[i]], str(int(ct.loc[i].sum()))] for i in ct.index]
    rows.append(["total", *[str(int(v)) for v in ct.sum(0)], str(int(ct.to_numpy().sum()))])
    head = ["label", *cols]
    widths = [max(len(r[k]) for r in [head, *rows]) for k in range(len(head))]
    fmt = lambda r: "  " + "  ".join(x.ljust(w) if k == 0 else x.rjust(w)  # noqa: E731
                                     for k, (x, w) in enumerate(zip(r, widths)))
    return [fmt(head), *[fmt(r) for r in rows]]

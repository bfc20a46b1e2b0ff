"""Confounding report: label × group table, one-group classes, Cramér's V, plain warnings."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REAL_DATA, write_manifest_dataset
from trainable.data.confounding import confounding_report, cramers_v, group_values
from trainable.data.dataset import load_dataset
from trainable.errors import DataError


def _table(rows: list[tuple[str, str, int]], **extra: str) -> pd.DataFrame:
    """(label, source, count) → a manifest-shaped table."""
    out = []
    for label, source, n in rows:
        out += [{"label": label, "source": source, **extra} for _ in range(n)]
    return pd.DataFrame(out)


def test_every_normal_from_one_source_is_named_in_plain_words() -> None:
    t = _table([("normal", "kermany", 40), ("pneumonia", "kermany", 40), ("pneumonia", "ieee8023", 5),
                ("covid", "ieee8023", 20)])
    lines, info = confounding_report(t, "source")
    assert info["single_group_classes"] == {"covid": "ieee8023", "normal": "kermany"}
    assert info["table"]["normal"] == {"kermany": 40, "ieee8023": 0}
    assert ("every `normal` image comes from `kermany` and no `covid` image does: a model can separate "
            "`normal` from `covid` by source alone") in info["warnings"]
    assert any(w.startswith("every `covid` image comes from `ieee8023`") for w in info["warnings"])
    assert info["cramers_v"] > 0.5 and info["strength"] == "strong"
    text = "\n".join(lines)
    assert "label × source" in text and "Cramér's V (label, source) = " in text
    assert "warning: every `normal` image comes from `kermany`" in text


def test_independent_groups_give_no_warning() -> None:
    t = _table([("normal", "a", 30), ("covid", "a", 30), ("normal", "b", 30), ("covid", "b", 30)])
    lines, info = confounding_report(t)
    assert info["cramers_v"] == pytest.approx(0.0) and info["warnings"] == []
    assert info["single_group_classes"] == {} and info["strength"] == "negligible"


def test_cramers_v_is_one_when_group_determines_label() -> None:
    ct = pd.DataFrame({"a": [10, 0], "b": [0, 7]}, index=["x", "y"])
    v, chi2, dof = cramers_v(ct)
    assert v == pytest.approx(1.0) and dof == 1 and chi2 == pytest.approx(17.0)


def test_single_group_column_is_a_note_not_a_warning() -> None:
    lines, info = confounding_report(_table([("normal", "phantom", 3), ("covid", "phantom", 3)]))
    assert info["warnings"] == [] and "no confounding by source can be measured" in lines[-1]


def test_any_column_and_a_derived_age_band() -> None:
    t = pd.DataFrame({"label": ["covid"] * 4 + ["normal"] * 4,
                      "age": ["65", "70", "81", "55", "3", "4", "2", ""],
                      "view": ["AP"] * 4 + ["PA"] * 4})
    _, by_view = confounding_report(t, "view")
    assert "every `covid` image has view `AP` and no `normal` image does" in by_view["warnings"][0]
    assert group_values(t, "age_band").tolist() == ["60-79", "60-79", "80+", "40-59", "0-17", "0-17",
                                                    "0-17", "(blank)"]
    _, by_age = confounding_report(t, "age_band")
    assert by_age["table"]["normal"]["0-17"] == 3 and by_age["single_group_classes"] == {}


def test_unknown_column_is_a_data_error_listing_columns() -> None:
    with pytest.raises(DataError, match="group-by column 'site' is not in the data; its columns are label, source"):
        confounding_report(_table([("a", "x", 1), ("b", "y", 1)]), "site")


def test_dataset_uses_its_task_classes(tmp_path: Path) -> None:
    root = write_manifest_dataset(tmp_path / "d", labels=("normal", "covid", "pneumonia"), n_patients=9)
    df = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)
    df["source"] = df["label"].map({"covid": "hospital-a", "normal": "hospital-b", "pneumonia": "hospital-b"})
    df.to_csv(root / "manifest.csv", index=False)
    lines, info = confounding_report(load_dataset(root, "covid_vs_rest"))
    assert info["classes"] == ["rest", "covid"]
    assert info["table"] == {"rest": {"hospital-b": 12, "hospital-a": 0}, "covid": {"hospital-b": 0, "hospital-a": 6}}
    assert info["cramers_v"] == pytest.approx(1.0)


@pytest.mark.skipif(not (REAL_DATA / "manifest.csv").is_file(), reason="cxr-real is not on this machine")
def test_cxr_real_source_confound() -> None:
    _, info = confounding_report(load_dataset(REAL_DATA))
    assert info["single_group_classes"] == {"covid": "ieee8023", "normal": "kermany"}
    assert info["warnings"][0] == ("every `normal` image comes from `kermany` and no `covid` image does: "
                                   "a model can separate `normal` from `covid` by source alone")

"""Space files: the shipped ones validate; every broken rule names the file, the field and the rule."""
from __future__ import annotations

from pathlib import Path

import pytest
from ray import tune

from search.space import SPACES_DIR, SpaceError, load_space, tune_param_space

GOOD = """
name: t
folds: 2
epochs: 2
space:
  backbone: {choice: [efficientnet_lite0]}
  lr: {loguniform: [1.0e-4, 1.0e-2]}
  hidden: 32
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", sorted(SPACES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_spaces_validate(path: Path) -> None:
    spec = load_space(path)
    assert spec.space


def test_good_space_becomes_tune_domains(tmp_path: Path) -> None:
    spec = load_space(_write(tmp_path, GOOD))
    space = tune_param_space(spec)
    assert isinstance(space["lr"], tune.search.sample.Float)
    assert space["hidden"] == 32
    assert spec.choices("backbone") == ["efficientnet_lite0"]


@pytest.mark.parametrize("text, message", [
    (GOOD + "  colour: red\n", r"space: unknown parameter\(s\) \['colour'\]"),
    (GOOD + "epochz: 3\n", r"epochz: unknown key"),
    (GOOD.replace("1.0e-4", "0.0"), r"space.*loguniform needs 0 < low < high \(got \[0.0, 0.01\]\)"),
    (GOOD.replace("efficientnet_lite0]", "resnet9000]"), r"unknown backbone 'resnet9000'"),
    (GOOD.replace("folds: 2", "folds: 1"), r"folds: Input should be greater than or equal to 2 \(got 1\)"),
    (GOOD + "objective: {metric: accuracyy}\n", r"objective.metric: Input should be"),
    ("space: [unclosed\n", r"not valid YAML"),
    ("num_samples: 4\nspace: {backbone: efficientnet_lite0, lr: 0.001}\n",
     r"num_samples is 4 but every parameter in `space` is fixed"),
    ("- a\n- b\n", r"top level must be a mapping"),
])
def test_bad_space_is_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SpaceError, match=message) as e:
        load_space(_write(tmp_path, text))
    assert str(tmp_path / "space.yaml") in str(e.value)


def test_missing_space_file(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match="not found"):
        load_space(tmp_path / "nope.yaml")

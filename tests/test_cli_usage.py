"""First contact: usage errors, `--version`, the bare command and `backbones` in a pipe.

Usage errors are found by the argument parser before a command's body runs (nothing heavy is
imported), so each case is a fraction of a second."""
from __future__ import annotations

import importlib.metadata

import pytest

from tests.conftest import cxrtune

SUBCOMMANDS = ["run", "select", "explain", "evaluate", "report", "resume", "submit", "status", "logs",
               "stop", "jobs", "data synth", "data check", "backbones"]


def _usage_error(proc, message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Usage:" in proc.stderr and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_unknown_option_prints_usage_and_exits_2(command: str) -> None:
    _usage_error(cxrtune(*command.split(), "--bogus", timeout=60), "No such option: --bogus")


@pytest.mark.parametrize("command, missing", [("select", "results"), ("data check", "path"),
                                              ("status", "job"), ("explain", "images")])
def test_missing_argument_prints_usage_and_exits_2(command: str, missing: str) -> None:
    _usage_error(cxrtune(*command.split(), timeout=60), f"Missing argument '{missing}'")


def test_bad_option_value_prints_usage_and_exits_2() -> None:
    _usage_error(cxrtune("select", "somewhere", "--within", "lots", timeout=60), "Invalid value for '--within'")


def test_bare_command_prints_help_and_exits_2() -> None:
    proc = cxrtune(timeout=60)
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    assert "Usage:" in out and "run" in out and "backbones" in out and "Traceback" not in out


def test_version() -> None:
    proc = cxrtune("--version", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"cxrtune {importlib.metadata.version('cxrtune')}"


def test_backbones_in_a_pipe_prints_full_names() -> None:
    from trainable.models.backbones import available_backbones

    proc = cxrtune("backbones", timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert rows[0] == ["name", "exact timm name", "source", "params", "Grad-CAM layer", "offline weights"]
    assert all(len(r) == 6 for r in rows)
    assert ["efficientnet_lite0", "tf_efficientnet_lite0.in1k"] == rows[[r[0] for r in rows].index("efficientnet_lite0")][:2]
    assert "timm.list_models()" in proc.stderr
    assert sorted(r[0] for r in rows[1:]) == sorted(available_backbones())
    assert max(len(r[0]) for r in rows) > 20  # a long name comes out whole (a rich table cut it)

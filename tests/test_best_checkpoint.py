"""Interop: Tune's own best checkpoint of a trial is its best epoch by the objective (CheckpointConfig
in search/sweep.py), read back with ray.tune.ExperimentAnalysis from a real sweep's RESULTS/tune."""
from __future__ import annotations

from pathlib import Path

from ray.tune import ExperimentAnalysis

from trainable.train.checkpoint import read_checkpoint


def test_experiment_analysis_best_checkpoint_is_the_best_epoch(tiny_sweep: Path) -> None:
    ea = ExperimentAnalysis(str(tiny_sweep / "tune"))
    assert ea.trials
    for trial in ea.trials:
        full = read_checkpoint(trial.checkpoint)["history"]  # the latest checkpoint: every epoch
        best_epoch = max(full, key=lambda h: h["objective"])["epoch"]
        best = read_checkpoint(ea.get_best_checkpoint(trial, metric="objective", mode="max"))
        assert best["history"][-1]["epoch"] == best_epoch, (trial.trial_id, [h["objective"] for h in full])


def test_montages_use_the_best_epoch_checkpoint(tiny_sweep: Path) -> None:
    """select's and the report's Grad-CAM montages explain the heads of the epoch trials.csv ranks
    (best_epoch), not the last epoch's (search/outputs/evidence.py best_checkpoint)."""
    from search.outputs.evidence import best_checkpoint
    from search.rundir import read_trials

    trials = read_trials(tiny_sweep)
    for _, row in trials[trials["status"] == "TERMINATED"].iterrows():
        state = best_checkpoint(tiny_sweep, row["trial_id"])
        assert state["history"][-1]["epoch"] == int(row["best_epoch"]), row["trial_id"]

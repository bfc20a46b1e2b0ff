"""The live trials.csv: rewritten each time a trial ends, so a stopped or killed sweep still
shows what finished."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
from ray import tune

from search.outputs.results import trial_rows
from search.rundir import read_trials
from trainable.atomic import atomic_write_text


class LiveTrials(tune.Callback):
    """Rewrites `RESULTS/trials.csv` (atomically) each time a trial ends, so a stopped or killed
    sweep still shows what finished; the final table (`search.outputs.results.write_results`) replaces it.

    Rows come from the same `trial_rows` as the final table. The history of running trials is
    part of Tune's experiment snapshot (`get_state`), so a resumed trial's row covers all its
    epochs; rows already in the file are kept."""

    def __init__(self, results: Path, epochs: int) -> None:
        self.results, self.epochs = Path(results), epochs
        self.history: dict[str, list[dict]] = {}

    def get_state(self) -> dict | None:
        return {"history": self.history} if self.history else None

    def set_state(self, state: dict) -> None:
        self.history = dict(state.get("history", {}))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        keep = {k: v for k, v in result.items() if k != "config" and not k.startswith("fold_")}
        rows = [r for r in self.history.get(trial.trial_id, [])
                if r.get("training_iteration") != keep.get("training_iteration")]
        self.history[trial.trial_id] = rows + [keep]

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._ended(trial, error=None)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._ended(trial, error=f"trial failed (see {trial.path})")

    def _ended(self, trial, error: str | None) -> None:
        rows = self.history.pop(trial.trial_id, [])
        ended = SimpleNamespace(metrics={"trial_id": trial.trial_id}, config=dict(trial.config),
                                path=trial.path, error=error,
                                metrics_dataframe=pd.DataFrame(rows) if rows else None)
        try:
            self._merge(trial_rows([ended], self.epochs))
        except Exception as e:  # noqa: BLE001 - the live table is a convenience, never a reason to fail
            print(f"warning: live trials.csv not updated ({type(e).__name__}: {e})")

    def _merge(self, df: pd.DataFrame) -> None:
        path = self.results / "trials.csv"
        if path.is_file():
            before = read_trials(self.results)
            df = pd.concat([before[~before["trial_id"].isin(df["trial_id"])], df], ignore_index=True)
        if "best_objective" in df:
            df = df.sort_values("best_objective", ascending=False, na_position="last")
        atomic_write_text(path, df.reset_index(drop=True).to_csv(index=False))

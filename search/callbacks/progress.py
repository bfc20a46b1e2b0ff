"""Live progress on the console: one line per finished, stopped or failed trial, best so far, ETA."""
from __future__ import annotations

import time
from typing import Callable

from ray import tune


class ProgressLine(tune.Callback):
    """Prints `[done/total] trial … epochs … objective … | best … | ETA` as trials end."""

    def __init__(self, total: int, epochs: int, metric: str, log: Callable[[str], None]) -> None:
        # epochs: the head epochs; a trial's own budget adds its ft_epochs (as trials.csv's stopped_early)
        self.total, self.epochs, self.metric, self.log = total, epochs, metric, log
        self.start = time.time()
        self.last: dict[str, dict] = {}
        self.best: tuple[float, str] | None = None
        self.done = self.stopped = self.failed = 0

    def __getstate__(self) -> dict:
        # the Tuner pickles its callbacks; a console logger holds a lock
        return {k: v for k, v in self.__dict__.items() if k != "log"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, log=print)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.last[trial.trial_id] = result
        if self.best is None or result["objective"] > self.best[0]:
            self.best = (result["objective"], trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        r = self.last.get(trial.trial_id, {})
        epochs = r.get("training_iteration", 0)
        planned = self.epochs + int((trial.config or {}).get("ft_epochs", 0) or 0)
        early = epochs < planned
        self.done += 1
        self.stopped += early
        how = f"stopped after {epochs}/{planned} epochs" if early else f"ran {epochs} epochs"
        self._line(f"trial {trial.trial_id} {how}: {self.metric} {r.get(self.metric, float('nan')):.3f}, "
                   f"lung {r.get('lung_mass', float('nan')):.2f}, edge {r.get('edge_mass', float('nan')):.2f}, "
                   f"objective {r.get('objective', float('nan')):.3f}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        self.failed += 1
        self._line(f"trial {trial.trial_id} FAILED (see {trial.local_path or 'the tune/ directory'})")

    def _line(self, text: str) -> None:
        elapsed = time.time() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        best = f"best {self.best[1]} {self.best[0]:.3f}" if self.best else "best -"
        self.log(f"[{self.done}/{self.total}] {text} | {best} | "
                 f"{self.stopped} stopped, {self.failed} failed | ETA {eta:.0f}s")

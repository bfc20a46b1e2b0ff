"""The one progress helper of the slow loops (feature pass, PSPNet, Grad-CAM at a layer, fine-tuning,
the export refit).

On a terminal: a `rich.progress` bar (done/total, rate, ETA), removed when the loop ends. Elsewhere
(logs, CI, Ray Jobs, a trial actor's log file): a plain line every 10% or every `_EVERY_S` seconds,
e.g. ``features efficientnet_lite0: 320/999 images, 41 img/s, ETA 17 s``. Loops shorter than
`_AFTER_S` seconds say nothing either way (a phantom sweep runs hundreds of them).

`CXRTUNE_PROGRESS`: ``auto`` (default: rich when stdout is a TTY), ``rich``, ``plain`` or ``off``;
`CXRTUNE_PROGRESS_AFTER_S`: the quiet start (default 2 s; 0 reports every loop).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

_EVERY_S = 10.0      # plain mode: at least one line this often, whatever the percentage
_STEPS = 10          # plain mode: a line at every further 10%
_ABBREV = {"images": "img", "epochs": "epoch"}
_live: list = []     # [rich Progress, users]: one live display at a time, nested loops share it
_live_lock = threading.Lock()  # the driver's feature threads open and close bars at the same time


def _mode() -> str:
    mode = os.environ.get("CXRTUNE_PROGRESS", "auto").strip().lower() or "auto"
    if mode == "auto":
        return "rich" if sys.stdout.isatty() else "plain"
    return mode if mode in ("rich", "plain", "off") else "plain"


def _after_s() -> float:
    try:
        return float(os.environ.get("CXRTUNE_PROGRESS_AFTER_S", "2"))
    except ValueError:
        return 2.0


def plain_line(label: str, done: int, total: int, unit: str, elapsed: float) -> str:
    """``label: done/total unit, rate, ETA`` (a slow loop's rate in seconds per item)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = f"ETA {(total - done) / rate:.0f} s" if rate > 0 and done < total else f"done in {elapsed:.1f} s"
    return f"{label}: {done}/{total} {unit}, {_speed(done, elapsed, unit)}, {eta}"


def _speed(done: int, elapsed: float, unit: str) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    short = _ABBREV.get(unit, unit)
    if rate >= 1:
        return f"{rate:.0f} {short}/s"
    return f"{1 / rate:.1f} s/{short}" if rate > 0 else f"- {short}/s"


class _Reporter:
    """Counts work done; shows it as `_mode()` says once the loop has run `_after_s()` seconds."""

    def __init__(self, label: str, total: int, unit: str, log: Callable[[str], None] | None) -> None:
        self.label, self.total, self.unit, self.log = label, max(int(total), 0), unit, log or print
        self.mode, self.after = _mode(), _after_s()
        self.start = self.last_line = time.perf_counter()
        self.done, self.printed, self.task = 0, 0, None
        self.next_at = self._threshold(0)

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.mode == "off" or now - self.start < self.after:
            return
        if self.mode == "rich":
            self._rich(now)
        elif self.done >= self.next_at or now - self.last_line >= _EVERY_S:
            self._plain(now)

    def _threshold(self, done: int) -> int:
        """The count of the next 10% mark after `done` (integers: no float drift)."""
        k = done * _STEPS // max(self.total, 1) + 1
        return -(-k * self.total // _STEPS)

    def _plain(self, now: float) -> None:
        self.log(plain_line(self.label, self.done, self.total, self.unit, now - self.start))
        self.printed, self.last_line = self.done, now
        self.next_at = self._threshold(self.done)

    def _rich(self, now: float) -> None:
        if self.task is None:  # started late (after the quiet start): the bar begins where the loop is
            progress = _open_live()
            self.task = progress.add_task(self.label, total=self.total, rate="")
        _live[0].update(self.task, completed=self.done, rate=_speed(self.done, now - self.start, self.unit))

    def close(self) -> None:
        if self.task is not None:
            _live[0].remove_task(self.task)
            _close_live()
        elif self.printed and self.printed != self.done:  # the plain log ends with the loop's total time
            self._plain(time.perf_counter())


def _open_live():
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with _live_lock:
        if not _live:
            progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("[progress.data.speed]{task.fields[rate]}"), TimeElapsedColumn(),
                                TextColumn("ETA"), TimeRemainingColumn(), transient=True,
                                console=Console(force_terminal=True))  # rich mode: a TTY, or CXRTUNE_PROGRESS=rich
            progress.start()
            _live[:] = [progress, 0]
        _live[1] += 1
        return _live[0]


def _close_live() -> None:
    with _live_lock:
        _live[1] -= 1
        if _live[1] <= 0:
            _live[0].stop()
            _live.clear()


@contextmanager
def progress(label: str, total: int, unit: str = "images",
             log: Callable[[str], None] | None = None) -> Iterator[Callable[[int], None]]:
    """`with progress("features lite0", len(images)) as advance: … advance(len(batch))`.

    `log`: where plain lines go (default print: stdout)."""
    reporter = _Reporter(label, total, unit, log)
    try:
        yield reporter.advance
    finally:
        reporter.close()


def track(items: Iterable[T], label: str, total: int | None = None, unit: str = "epochs",
          log: Callable[[str], None] | None = None, step: Callable[[T], int] | None = None) -> Iterator[T]:
    """`for epoch in track(range(n), "export refit head"):` — one step per item; `step(item)`: the
    units an item stands for (a batch start → its batch size; `total` then counts units)."""
    if total is None:
        total = len(items)  # type: ignore[arg-type]
    with progress(label, total, unit, log) as advance:
        for item in items:
            yield item
            advance(1 if step is None else step(item))

"""Progress of long stages (layer-by-layer calibration, the structure check, evaluation) as `logging` lines.

One INFO line on the ``rotsparse`` logger per step (or every `Progress.every` steps, and always the last), with
the time elapsed in the stage and an estimate of what is left from the mean time per step so far. Nothing is
printed; the application decides what the logger shows (the ``rotsparse`` command: INFO unless ``-q``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

logger = logging.getLogger("rotsparse")

Item = TypeVar("Item")


def format_seconds(seconds: float) -> str:
    """'4.2 s', '3 min 05 s' or '2 h 07 min'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Counts the steps of one stage of `total` steps and logs a line for each (`enabled`: else silent).

    every: log every `every`-th step (and the last); None: about 20 lines in all.
    """

    def __init__(self, stage: str, total: int, enabled: bool = True, unit: str = "step", every: int | None = 1):
        self.stage, self.total, self.enabled, self.unit = stage, total, enabled, unit
        self.every = max(1, total // 20) if every is None else every
        self.done = 0
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def eta(self) -> float:
        """Seconds left, extrapolated from the mean time per step so far (0 before the first step)."""
        return self.elapsed / self.done * (self.total - self.done) if self.done else 0.0

    def step(self, count: int = 1, detail: str = "") -> None:
        """Mark `count` more steps done; `detail` is appended to the line (e.g. a step's own timing)."""
        self.done += count
        if not self.enabled or not logger.isEnabledFor(logging.INFO):
            return
        if self.done // self.every == (self.done - count) // self.every and self.done < self.total:
            return
        logger.info("rotsparse: %s: %s %d/%d, %s elapsed, ETA %s%s", self.stage, self.unit, self.done, self.total,
                    format_seconds(self.elapsed), format_seconds(self.eta()), f" ({detail})" if detail else "")

    def iterate(self, items: Iterable[Item]) -> Iterator[Item]:
        """Yield `items`, one step after each has been handled by the loop body."""
        for item in items:
            yield item
            self.step()

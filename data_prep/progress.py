"""Progress of the data_prep commands: a tqdm bar on a terminal; in a log file, where a bar is
a heap of carriage returns (and tqdm draws none at all), a plain line every minute, so that a
job of an hour is not silent for an hour."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm

LOG_EVERY_S = 60.0


class _Lines:
    """tqdm's update/close, printing `desc: N unit (of TOTAL), M min S s` every `every` s."""

    def __init__(self, desc: str, unit: str, total: int | None, every: float) -> None:
        self.desc, self.unit, self.total, self.every = desc, unit, total, every
        self.n = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            of = f" of {self.total:,}" if self.total else ""
            minutes, seconds = divmod(int(now - self.start), 60)
            print(f"{self.desc}: {self.n:,}{of} {self.unit}s, {minutes} min {seconds} s",
                  file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        pass


def progress(
    desc: str, unit: str, *, total: int | None = None, enabled: bool = True,
    every: float = LOG_EVERY_S,
) -> Any:  # fmt: skip
    """An object with tqdm's update(n) and close(): a bar on a terminal, lines in a log file,
    nothing when not enabled (--quiet)."""
    if enabled and not sys.stderr.isatty():
        return _Lines(desc, unit, total, every)
    return tqdm(desc=desc, unit=unit, total=total, disable=not enabled)

"""Progress lines for every pass over data that takes a while: done / total, rate, ETA.

The training loop prints its own line (losses beside the rate); extraction, sampling and scoring use
`Progress`: one line every `every` seconds (and at the end) on process 0, e.g.
  extract 1,200/6,000 images  93.4 images/s  ETA 0m51s
"""

from __future__ import annotations

import time

import jax


def format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """`update(n)` after each piece of work; prints `what done/total unit  rate unit/s  ETA` every `every`
    seconds and when done reaches total (process 0 only; `every=0` prints at every update)."""

    def __init__(self, what: str, total: int, *, unit: str = "images", every: float = 10.0, done: int = 0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.done = self._start_done = done
        self._start = self._last = time.time()

    @property
    def rate(self) -> float:
        """Units per second since this Progress was made (what this session did, not earlier sessions)."""
        return (self.done - self._start_done) / max(time.time() - self._start, 1e-9)

    def line(self) -> str:
        rate = self.rate
        eta = format_eta((self.total - self.done) / rate) if rate > 0 else "?"
        return f"{self.what} {self.done:,}/{self.total:,} {self.unit}  {rate:,.1f} {self.unit}/s  ETA {eta}"

    def update(self, count: int) -> None:
        self.done += count
        now = time.time()
        if self.done >= self.total or now - self._last >= self.every:
            self._last = now
            if jax.process_index() == 0:
                print(self.line(), flush=True)

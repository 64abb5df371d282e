"""Requests arriving together, sampled together: rows of many requests in one call of the one compiled sampler.

Each request is split into rows (one per image: class, seed, sample index, settings). One worker thread takes
the rows waiting (up to the largest batch size, after waiting at most `max_wait_s` for more to arrive), pads
them to the smallest of a few fixed batch sizes (each compiled once, at start-up: `warm_up`) and runs them
through the front end (sampling/images.py Painter). A row's images depend only on its own class, seed, index
and settings (per-sample keys and settings, each image decoded alone), so a request gets the same images
whether it ran alone or beside others, in any batch size.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from typing import Callable

import numpy as np

from fvq_jax.sampling.images import Painter
from fvq_jax.sampling.sampler import SamplingConfig, settings_of

# Event callbacks (called from the worker thread): ("progress", fraction of the request's images done),
# ("images", [(slot, codes [N], uint8 image [H, W, 3])]) as each batch finishes, ("done", None), ("error", exception).
Listener = Callable[[str, object], None]


class Ticket:
    """One request: its `n` rows' results by slot, a future that resolves to (codes [n, N], images [n, H, W, 3])."""

    def __init__(self, n: int, listener: Listener | None = None):
        self.n, self.listener = n, listener
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.codes: list = [None] * n
        self.images: list = [None] * n
        self.finished = 0

    def _tell(self, kind: str, payload) -> None:
        if self.listener is not None:
            self.listener(kind, payload)

    def progress(self, running: int, fraction: float) -> None:
        """`running` of this request's rows are in the running batch, `fraction` of their positions sampled."""
        self._tell("progress", (self.finished + running * fraction) / self.n)

    def deliver(self, results: list[tuple[int, np.ndarray, np.ndarray]]) -> None:
        for slot, codes, image in results:
            self.codes[slot], self.images[slot] = codes, image
        self.finished += len(results)
        self._tell("images", results)
        if self.finished == self.n:
            self._tell("done", None)
            self.future.set_result((np.stack(self.codes), np.stack(self.images)))

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self._tell("error", error)
            self.future.set_exception(error)


@dataclasses.dataclass(frozen=True)
class Row:
    label: int
    seed: int
    index: int  # the sample index that, with the seed, gives the sample's key
    settings: SamplingConfig
    ticket: Ticket
    slot: int  # which of the ticket's images


class Batcher:
    """Batches the rows of every submitted request into `painter` calls at `batch_sizes` (ascending)."""

    def __init__(self, painter: Painter, batch_sizes: tuple[int, ...], *, max_wait_s: float, segments: int):
        self.painter, self.batch_sizes = painter, tuple(batch_sizes)
        self.max_wait_s, self.segments = max_wait_s, segments
        self._queue: list[Row] = []
        self._cond = threading.Condition()
        self._closed = False
        self.batches: list[int] = []  # rows per batch run, for the benchmark and the tests
        self._thread = threading.Thread(target=self._work, name="batcher", daemon=True)
        self._thread.start()

    def warm_up(self) -> float:
        """Compile every batch size (one call each, `segments` segments); returns the seconds it took."""
        start = time.perf_counter()
        for size in self.batch_sizes:
            self.painter(np.zeros(size, np.int32), np.zeros(size), np.arange(size), segments=self.segments)
        return time.perf_counter() - start

    def submit(self, labels, seeds, indices, settings: SamplingConfig, listener: Listener | None = None) -> Ticket:
        """One request's rows (labels, seeds, indices: [n] each, one setting) -> its Ticket."""
        ticket = Ticket(len(labels), listener)
        rows = [Row(int(label), int(seed), int(index), settings, ticket, slot)
                for slot, (label, seed, index) in enumerate(zip(labels, seeds, indices))]
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._queue.extend(rows)
            self._cond.notify()
        return ticket

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        """Run what is queued, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    # -------------------------------------------------------------------------------------------- worker

    def _take(self) -> list[Row] | None:
        """The next batch's rows (None: closed and nothing left)."""
        largest = self.batch_sizes[-1]
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            deadline = time.monotonic() + self.max_wait_s
            while len(self._queue) < largest and not self._closed and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            rows, self._queue[:] = self._queue[:largest], self._queue[largest:]
            return rows

    def _work(self) -> None:
        while (rows := self._take()) is not None:
            self._run(rows)

    def _run(self, rows: list[Row]) -> None:
        size = next(s for s in self.batch_sizes if s >= len(rows))
        padded = rows + [rows[0]] * (size - len(rows))  # padding rows repeat a real one; their results are dropped
        tickets: dict[int, tuple[Ticket, int]] = {}
        for row in rows:
            ticket, count = tickets.get(id(row.ticket), (row.ticket, 0))
            tickets[id(row.ticket)] = (ticket, count + 1)

        def progress(done: int, total: int) -> None:
            for ticket, count in tickets.values():
                ticket.progress(count, done / total)

        try:
            codes, images = self.painter(np.array([r.label for r in padded]), np.array([r.seed for r in padded]),
                                         np.array([r.index for r in padded]), settings_of([r.settings for r in padded]),
                                         progress=progress, segments=self.segments)
        except Exception as error:  # noqa: BLE001 - the requests get the error; the server goes on
            for ticket, _ in tickets.values():
                ticket.fail(error)
            return
        self.batches.append(len(rows))
        results: dict[int, list] = {}
        for i, row in enumerate(rows):
            results.setdefault(id(row.ticket), []).append((row.slot, codes[i], images[i]))
        for key, (ticket, _) in tickets.items():
            ticket.deliver(results[key])

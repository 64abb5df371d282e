"""Unreadable images: skipped, counted and named, never a crash and never a silent substitute.

How a skip travels (exact with any number of grain worker processes):
  1. `read_image` returns an `Unreadable` marker (name and reason) instead of raising, in a worker
     or a thread, silently: read-ahead decodes records long before they are used, so a log there
     would repeat one file dozens of times;
  2. `DropUnreadable`, right before batching and so inside each worker, drops markers and writes
     "name<TAB>reason" of the files dropped since the last kept image into that image's 'skipped';
  3. the batch carries those strings to the main process, where `SkipLog` counts every skip and
     logs each file once, with its reason (the training iterator also keeps the count in its
     checkpointed state).
A bad file is counted each time it is used: once per epoch in training.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import grain
import numpy as np
from absl import logging
from PIL import Image

from fvq_jax.data.sources import Record, load_image


@dataclasses.dataclass(frozen=True)
class Unreadable:
    """A record whose image could not be decoded."""
    name: str
    index: int  # position in the source
    reason: str = ""

    def entry(self) -> str:
        """How the skip travels in a batch's 'skipped' string."""
        return f"{self.name}\t{self.reason}" if self.reason else self.name


def read_image(record: Record) -> Image.Image | Unreadable:
    """load_image(record), or an Unreadable marker naming the reason when decoding fails."""
    try:
        return load_image(record)
    except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... on bad files
        reason = f"{type(error).__name__}: {error}".replace("\n", " ").replace("\t", " ")
        return Unreadable(name=record["name"], index=record["index"], reason=reason)


class DropUnreadable(grain.IterDataset):
    """Drops Unreadable markers; each kept example gets 'skipped': newline-joined names dropped before it.

    Raises once every one of the `num_records` records has failed: nothing would ever be yielded.
    """

    def __init__(self, parent: grain.IterDataset, num_records: int, description: str):
        super().__init__(parent)
        self._num_records = num_records
        self._description = description

    def __iter__(self) -> grain.DatasetIterator:
        return _DropUnreadableIterator(self._parent.__iter__(), self._num_records, self._description)


class _DropUnreadableIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, num_records: int, description: str):
        super().__init__(parent)
        self._num_records = num_records
        self._description = description
        self._failed: set[int] = set()

    def __next__(self) -> dict[str, Any]:
        names = []
        while isinstance(example := next(self._parent), Unreadable):
            names.append(example.entry())
            self._failed.add(example.index)
            if len(self._failed) >= self._num_records:
                raise ValueError(f"no readable image in {self._description}: all {self._num_records} failed to decode")
        return {**example, "skipped": "\n".join(names)}

    # Markers are consumed within one __next__, so the parent's state is the whole state.
    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class SkipLog:
    """Skipped files seen by the main process: a running count, the names of this session, and one
    log line per file (the first time it is skipped)."""

    def __init__(self, count: int = 0):
        self.count = count
        self.names: list[str] = []
        self._logged: set[str] = set()

    def record(self, skipped: Iterable[str] | np.ndarray) -> None:
        """skipped: a batch's 'skipped' strings ([B], '' where nothing was skipped)."""
        entries = [entry for cell in np.asarray(skipped).tolist() for entry in cell.split("\n") if entry]
        for entry in entries:
            name, _, reason = entry.partition("\t")
            self.count += 1
            self.names.append(name)
            if name not in self._logged:
                self._logged.add(name)
                logging.warning("skipped unreadable image %s (%s); %d skip(s) so far, later skips of this file "
                                "are counted without a log line", name, reason or "unknown reason", self.count)

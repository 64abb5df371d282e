"""Extraction as a pipeline: views made per image on threads / worker processes, batched across the crops into
one device batch, encoded while the host makes and writes the batches around it.

  records of this process's shards (then padding) -> Views per image (data.read_threads threads; data.num_workers
  processes) -> batch of B images -> [B * A, S, S, 3] global array -> jitted encode (async) -> codes written
  once `IN_FLIGHT` later batches have been dispatched.

On a CPU the encoder is the bound (it is the same cores); on an accelerator the views are, and the threads and
workers keep it fed (fvq_jax/benchmarks/extraction.py measures both).
"""

from __future__ import annotations

import collections
from typing import Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fvq_jax import sharding
from fvq_jax.data.codes import Shard, ShardWriter
from fvq_jax.data.pipeline import prefetch
from fvq_jax.data.sources import Record
from fvq_jax.data.spec import DataSpec
from fvq_jax.data.unreadable import SkipLog
from fvq_jax.data.value_range import to_model_range
from fvq_jax.extraction.views import PADDING, Views
from fvq_jax.progress import Progress

IN_FLIGHT = 2  # batches dispatched to the device before the oldest one's codes are written


def image_batches(source: Sequence[Record], shards: list[Shard], views: Views, local_batch: int, num_steps: int,
                  data: DataSpec) -> grain.DatasetIterator:
    """This process's `num_steps` batches {'views': uint8 [B, A, S, S, 3], 'label', 'index', 'mask', 'skipped':
    [B]}: its shards' images in source order, then padding. An iterator to close (it may hold worker processes)."""
    parts = [grain.MapDataset.source(source)[s.start:s.end] for s in shards]
    padding = num_steps * local_batch - sum(s.end - s.start for s in shards)
    if padding:
        parts.append(grain.MapDataset.source([PADDING] * padding))
    records = grain.MapDataset.concatenate(parts) if len(parts) > 1 else parts[0]
    # Views per image, so that the images of one batch are cropped on several threads; two batches read ahead.
    options = grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=2 * local_batch)
    dataset = records.map(views).to_iter_dataset(options).batch(local_batch)
    return iter(prefetch(dataset, data.num_workers, data.prefetch_buffer))


class Encoder:
    """The tokenizer's encode on its mesh: each process's uint8 views [b, S, S, 3] -> the global batch's codes,
    int32 [b * processes, h, w], sharded over the batch axes (jitted once per batch shape)."""

    def __init__(self, model: nnx.Module, mesh: jax.sharding.Mesh):
        self._graph, self._params, self._rest = nnx.split(model, nnx.Param, ...)
        self._sharding = sharding.data_sharding(mesh)
        self._encode = jax.jit(self._indices, out_shardings=self._sharding)

    def _indices(self, params, rest, images: jax.Array) -> jax.Array:
        _, indices, _ = nnx.merge(self._graph, params, rest).encode(to_model_range(images))
        return indices.astype(jnp.int32)

    def grid(self, image_size: int, batch: int) -> tuple[int, ...]:
        """The code grid (h, w) of one view, from the encode's shapes alone."""
        probe = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)
        return tuple(jax.eval_shape(self._encode, self._params, self._rest, probe).shape[1:])

    def put(self, local_views: np.ndarray) -> jax.Array:
        """This process's views, uint8 [b, S, S, 3], as its rows of the global batch on the devices."""
        return jax.make_array_from_process_local_data(self._sharding, local_views)

    def encode(self, images: jax.Array) -> jax.Array:
        """Dispatch (asynchronously) the encode of a global batch already on the devices."""
        return self._encode(self._params, self._rest, images)

    def __call__(self, local_views: np.ndarray) -> jax.Array:
        return self.encode(self.put(local_views))


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order make_array_from_process_local_data
    took them (its addressable row blocks in global order; replicas over other mesh axes coincide)."""
    blocks = {shard.index[0].start or 0: shard.data for shard in x.addressable_shards}
    return np.concatenate([np.asarray(blocks[start]) for start in sorted(blocks)])


def write_batch(writer: ShardWriter, batch: dict[str, np.ndarray], codes: jax.Array, grid: tuple[int, ...]) -> None:
    """Hand a batch's images to the shard writer: codes [A, h, w] of each readable one, a skip of each unreadable
    one, nothing for padding (waits for the batch's codes)."""
    local_batch, num_views = batch["views"].shape[:2]
    codes = local_rows(codes).reshape((local_batch, num_views) + grid)
    for row in range(local_batch):
        if batch["index"][row] >= 0:  # not padding
            writer.add(int(batch["index"][row]), int(batch["label"][row]),
                       codes[row] if batch["mask"][row] else None, str(batch["skipped"][row]))


def encode_batches(batches: Iterator[dict[str, np.ndarray]], num_steps: int, encoder: Encoder,
                   writer: ShardWriter, grid: tuple[int, ...], progress: Progress, global_batch: int) -> None:
    """Encode `num_steps` batches and write their codes, keeping IN_FLIGHT batches on the device while the host
    makes the next ones and writes the finished ones; unreadable images are logged once each (SkipLog).
    `progress` counts every process's written images (global_batch per step, up to its total)."""
    skips = SkipLog()
    pending: collections.deque = collections.deque()

    def write_oldest() -> None:
        write_batch(writer, *pending.popleft(), grid)
        progress.update(min(global_batch, progress.total - progress.done))

    for _ in range(num_steps):
        batch = next(batches)
        skips.record(batch["skipped"])
        views = batch["views"]
        pending.append((batch, encoder(views.reshape((-1,) + views.shape[2:]))))
        if len(pending) > IN_FLIGHT:
            write_oldest()
    while pending:
        write_oldest()

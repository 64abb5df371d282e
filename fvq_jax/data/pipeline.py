"""grain input pipelines: the checkpointable training iterator, the padded eval batches, global arrays.

Training, per process:
  source[process_index::process_count] -> seed -> shuffle -> repeat -> random_map(decode, crop, flip)
  -> to_iter_dataset (data.read_threads decode threads) -> DropUnreadable -> batch(local batch)
  -> mp_prefetch (data.num_workers processes; 0 = in the main process) -> TrainIterator.
Evaluation, per process: the first num_images records, strided across processes, padded to the
same number of fixed-size batches on every process, with 'mask' False on padding.

Batches are numpy, images uint8 [B, S, S, 3]; `to_global_batch` makes global jax.Arrays and
`value_range.to_model_range` maps images to [-1, 1] inside the jitted step.

Determinism: a batch depends only on (data config, seed, process_index, process_count, num_workers)
and its position. num_workers matters because grain deals the record stream out to the workers, each
batching its own share; `TrainIterator.get_state/set_state` resume exactly under the same settings.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

from fvq_jax import config_lib
from fvq_jax.data.sources import Record, make_source
from fvq_jax.data.spec import DataSpec
from fvq_jax.data.transforms import center_crop, random_flip, random_resize_crop, random_zoom_crop
from fvq_jax.data.unreadable import DropUnreadable, SkipLog, Unreadable, read_image

_PADDING: Record = {"padding": True}


def local_batch_size(global_batch: int, process_count: int, field: str) -> int:
    """global_batch (a checked positive int) / process_count, or ConfigError(field) when it does not divide."""
    config_lib.require(global_batch % process_count == 0, field,
                       f"{global_batch} is not divisible by the {process_count} processes")
    return global_batch // process_count


@dataclasses.dataclass(frozen=True)
class TrainExample(grain.transforms.RandomMap):
    """record -> {'image': uint8 [S, S, 3], 'label': int32}, or Unreadable."""
    image_size: int
    crop: str
    max_resize_ratio: float
    flip: bool

    def random_map(self, record: Record, rng: np.random.Generator) -> dict[str, Any] | Unreadable:
        image = read_image(record)
        if isinstance(image, Unreadable):
            return image
        return {"image": self.view(image, rng), "label": np.int32(record["label"])}

    def view(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        """One random training view of `image` (crop, then flip): uint8 [S, S, 3]."""
        if self.crop == "zoom":
            pixels = random_zoom_crop(image, self.image_size, rng)
        else:
            pixels = random_resize_crop(image, self.image_size, self.max_resize_ratio, rng)
        return random_flip(pixels, rng) if self.flip else pixels


@dataclasses.dataclass(frozen=True)
class EvalExample(grain.transforms.Map):
    """record -> {'image': center crop, 'label', 'mask': True, 'skipped': ''}; padding and unreadable
    records give zeros with mask False (an unreadable one names itself in 'skipped')."""
    image_size: int

    def map(self, record: Record) -> dict[str, Any]:
        image = None if "padding" in record else read_image(record)
        valid = image is not None and not isinstance(image, Unreadable)
        size = self.image_size
        return {
            "image": center_crop(image, size) if valid else np.zeros((size, size, 3), np.uint8),
            "label": np.int32(record["label"] if valid else 0),
            "mask": np.bool_(valid),
            "skipped": image.entry() if isinstance(image, Unreadable) else "",
        }


class TrainIterator(grain.DatasetIterator):
    """Endless batches {'image': uint8 [B, S, S, 3], 'label': int32 [B]}, B = global_batch / process_count.

    `num_skipped`: unreadable files this process skipped so far (saved in the state, so it survives a
    resume; exact with worker processes too, see fvq_jax.data.unreadable); `skipped_files`: their names
    in this session. Restore only into an iterator built with the same data config, seed, process
    count and num_workers (the state's layout depends on num_workers). Checkpoint it with Orbax as
    `ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(iterator))` and restore with
    `grain.checkpoint.CheckpointRestore(iterator)` on a freshly built iterator.
    """

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self._skips = SkipLog()

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._parent))
        self._skips.record(batch.pop("skipped"))
        return batch

    @property
    def num_skipped(self) -> int:
        return self._skips.count

    @property
    def skipped_files(self) -> list[str]:
        return self._skips.names

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "num_skipped": self._skips.count}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self._skips.count = int(state["num_skipped"])


class EvalBatches:
    """A re-iterable, finite sequence of `len(self)` batches {'image', 'label', 'mask': bool [B]}, the same
    count on every process. Unreadable images are masked out and counted in `num_skipped` (summed over passes)."""

    def __init__(self, dataset: grain.IterDataset, num_batches: int, num_records: int, description: str):
        self._dataset = dataset
        self._num_batches = num_batches
        self._num_records = num_records
        self._description = description
        self._skips = SkipLog()

    def __len__(self) -> int:
        return self._num_batches

    @property
    def num_skipped(self) -> int:
        return self._skips.count

    @property
    def skipped_files(self) -> list[str]:
        return self._skips.names

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        iterator = iter(self._dataset)
        readable = 0
        try:
            for batch in iterator:
                batch = dict(batch)
                self._skips.record(batch.pop("skipped"))
                readable += int(batch["mask"].sum())
                yield batch
        finally:
            iterator.close()
        if self._num_records and not readable:
            raise ValueError(f"no readable image in {self._description}: all {self._num_records} failed to decode")


def process_slot(process_index: int | None = None, process_count: int | None = None) -> tuple[int, int]:
    """(process index, process count): the arguments, or JAX's where they are None."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, {count})")
    return index, count


def _read_options(data_cfg, buffer: int | None = None) -> grain.ReadOptions:
    if buffer is None:
        return grain.ReadOptions(num_threads=data_cfg.read_threads)
    return grain.ReadOptions(num_threads=data_cfg.read_threads, prefetch_buffer_size=buffer)


def prefetch(dataset: grain.IterDataset, num_workers: int, buffer: int) -> grain.IterDataset:
    """`dataset` read ahead by `num_workers` worker processes, `buffer` elements each (0 workers: as it is)."""
    if not num_workers:
        return dataset
    if not flags.FLAGS.is_parsed():
        # grain 0.2.18 reads one of its absl flags in mp_prefetch and fails when the program did not
        # parse flags (scripts, tests; grain issue #1355): the defaults are what we want.
        flags.FLAGS.mark_as_parsed()
    return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer))


class ProcessShare(grain.MapDataset):
    """Process p's share of every global batch: local element i is global element
    (i // L) * G + p * L + i % L, with L = G / P the local batch. The global stream (shuffle and
    augmentation keyed on the global position) is therefore the same for any number of processes."""

    def __init__(self, parent: grain.MapDataset, index: int, count: int, local_batch: int):
        super().__init__(parent)
        self._index, self._count, self._local = index, count, local_batch

    def __len__(self) -> int:
        return len(self._parent) // self._count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        row, col = divmod(i, self._local)
        return self._parent[row * self._local * self._count + self._index * self._local + col]

    def __str__(self) -> str:
        return f"ProcessShare(index={self._index}, count={self._count}, local_batch={self._local})"


def train_iterator(data_cfg: DataSpec, *, global_batch: int, seed: int, process_index: int | None = None,
                   process_count: int | None = None) -> TrainIterator:
    """This process's endless, shuffled, augmented training batches (see TrainIterator).

    One global stream (epoch-wise shuffle and random crops keyed on the global position, from
    `seed`) is cut into global batches; each process decodes only its columns of every batch, so
    the global batches do not depend on the process count.
    """
    index, count = process_slot(process_index, process_count)
    batch = local_batch_size(global_batch, count, "train.global_batch")
    source = make_source(data_cfg, train=True)
    description = f"the training data of process {index} of {count} ({len(source)} records in all)"
    if not len(source):
        raise ValueError(f"{description}: the source is empty")
    example = TrainExample(data_cfg.image_size, data_cfg.train_crop, data_cfg.max_resize_ratio, data_cfg.flip)
    stream = grain.MapDataset.source(source).seed(seed).shuffle().repeat().random_map(example)
    dataset = ProcessShare(stream, index, count, batch)
    dataset = DropUnreadable(dataset.to_iter_dataset(_read_options(data_cfg)), len(source), description)
    dataset = prefetch(dataset.batch(batch, drop_remainder=True), data_cfg.num_workers, data_cfg.prefetch_buffer)
    return TrainIterator(iter(dataset))


def eval_batches(data_cfg: DataSpec, *, batch_size: int, num_images: int = 0, process_index: int | None = None,
                 process_count: int | None = None) -> EvalBatches:
    """Center-cropped eval batches of batch_size / process_count images (batch_size is global).

    The first num_images records of the eval split (0 = all) are dealt out process_index::process_count;
    every process pads its share to the same number of batches, marking padding with mask False.
    """
    index, count = process_slot(process_index, process_count)
    batch = local_batch_size(batch_size, count, "eval.batch_size")
    source = make_source(data_cfg, train=False)
    total = min(num_images, len(source)) if num_images else len(source)
    num_batches = math.ceil(math.ceil(total / count) / batch)
    shard = grain.MapDataset.source(source)[:total][index::count]
    padding = num_batches * batch - len(shard)
    records = grain.MapDataset.concatenate([shard, grain.MapDataset.source([_PADDING] * padding)]) if padding else shard
    dataset = records.map(EvalExample(data_cfg.image_size)).batch(batch)
    # Elements are whole batches here: buffer a few, not grain's default of 500.
    dataset = prefetch(dataset.to_iter_dataset(_read_options(data_cfg, buffer=max(2, data_cfg.read_threads))),
                       data_cfg.num_workers, data_cfg.prefetch_buffer)
    description = f"the eval shard {index} of {count} ({len(shard)} of {total} records)"
    return EvalBatches(dataset, num_batches, len(shard), description)


def to_global_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Each process's local batch -> global jax.Arrays of batch global_batch, laid out by `sharding`
    (e.g. NamedSharding(mesh, P('data')) over the leading axis; every leaf shares it)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

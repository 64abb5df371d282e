"""Codebook usage: the training-time FIFO window and exact usage over a set.

Training usage, as FVQ reports it: the fraction of the K codes that appear among the most
recent W assignments, W = 65,536 when K < 65,536 and K + 1 otherwise. The window is a ring
buffer of indices kept in the model state (`CodeUsage` variables) and updated inside the
jitted train step; slots not yet written hold -1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fvq_jax.quantizers import ops


class CodeUsage(nnx.Variable):
    """Model state for usage tracking: not a parameter, never sees a gradient."""


def default_window(num_codes: int) -> int:
    """The FVQ window: 65,536 indices below K = 65,536, else K + 1."""
    return 65_536 if num_codes < 65_536 else num_codes + 1


def init_window(size: int) -> tuple[jax.Array, jax.Array]:
    """An empty window: (buffer [W] int32 filled with -1, write position scalar int32)."""
    if size <= 0:
        raise ValueError(f"usage window must be positive, got {size}")
    return jnp.full((size,), -1, jnp.int32), jnp.zeros((), jnp.int32)


def push(buffer: jax.Array, position: jax.Array, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Append `indices` (any shape, flattened in order) to the ring buffer, dropping the oldest."""
    size = buffer.shape[0]
    flat = indices.reshape(-1).astype(jnp.int32)
    n = flat.shape[0]
    if n >= size:
        # Only the newest `size` survive; position 0 then holds the oldest of them.
        return flat[n - size:], jnp.zeros((), jnp.int32)
    slots = (position + jnp.arange(n, dtype=jnp.int32)) % size
    return buffer.at[slots].set(flat), (position + n) % size


def seen_codes(indices: jax.Array, num_codes: int) -> jax.Array:
    """[K] bool: which codes occur in `indices`; negative entries (empty slots) are ignored."""
    flat = indices.reshape(-1)
    flat = jnp.where(flat >= 0, flat, num_codes)  # out of range -> dropped by the scatter
    return jnp.zeros((num_codes,), jnp.bool_).at[flat].set(True, mode="drop")


def window_usage(buffer: jax.Array, num_codes: int) -> jax.Array:
    """Fraction of the K codes present in the window (scalar float32)."""
    return jnp.mean(seen_codes(buffer, num_codes).astype(jnp.float32))


class UsageCounter:
    """Exact usage over a whole evaluation set, accumulated on the host batch by batch.

    >>> counter = UsageCounter(num_codes=1024)
    >>> counter.update(indices)          # any shape, any number of times
    >>> counter.usage, counter.perplexity, counter.dead_codes
    """

    def __init__(self, num_codes: int):
        self.num_codes = num_codes
        self.counts = np.zeros((num_codes,), np.int64)

    def update(self, indices) -> None:
        flat = np.asarray(indices).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.num_codes):
            raise ValueError(f"code indices must lie in [0, {self.num_codes}), got [{flat.min()}, {flat.max()}]")
        self.counts += np.bincount(flat, minlength=self.num_codes)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def usage(self) -> float:
        return float(np.mean(self.counts > 0))

    @property
    def dead_codes(self) -> int:
        return int(np.sum(self.counts == 0))

    @property
    def perplexity(self) -> float:
        p = self.counts[self.counts > 0] / max(self.total, 1)
        return float(np.exp(-np.sum(p * np.log(p))))


def batch_usage(indices: jax.Array, num_codes: int) -> jax.Array:
    """Fraction of codes used within one batch of indices (scalar, jittable)."""
    return jnp.mean((ops.code_counts(indices, num_codes) > 0).astype(jnp.float32))

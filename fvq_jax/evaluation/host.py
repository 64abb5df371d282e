"""Device arrays to host numpy, for metrics accumulated on the host.

The eval pipeline feeds global batches sharded over the 'data' mesh axis. On one process every
shard is addressable and `jax.device_get` assembles the whole array. On several hosts each
process holds only its shards, so `to_host` all-gathers them first (`process_allgather`, tiled):
every process then sees the full global batch and accumulates identical statistics, and any
process (usually process 0) can write the results.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def to_host(x) -> np.ndarray:
    """A jax array (sharded or not, any host layout) or array-like -> numpy array of the whole."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

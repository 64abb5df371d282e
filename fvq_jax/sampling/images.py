"""The one sampling front end: class-conditional images from a GPT, decoded by its tokenizer, on one mesh.

`Painter` is what every caller uses: the sampling job (sampling/job.py), the server (fvq_jax/serving), the
GPT trainer's sample grids (`class_grid`) and the benchmarks. A batch is given as per-sample rows: label,
seed, global index and settings. Sample i of seed s draws from fold_in(key(s), i) (sampler.index_keys), so a
sample's codes depend on (seed, index, settings) only, never on the batch, its other rows, or the devices;
each image is decoded on its own (`decode_fn`), so its pixels do not depend on them either.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from fvq_jax import sharding
from fvq_jax.data.value_range import to_uint8
from fvq_jax.sampling.sampler import SamplingConfig, Settings, check_labels, decoding_fns, index_keys

MAX_SEED = 2 ** 31  # jax.random.key of an int32


def balanced_labels(indices, num_samples: int, num_classes: int) -> np.ndarray:
    """The class of each global sample index: floor(i * C / N), so every class gets N / C samples (+-1) in
    contiguous runs, whatever batch or device a sample lands on."""
    indices = np.asarray(indices, np.int64)
    return (indices * num_classes // num_samples).astype(np.int32)


def first_of_class(classes, num_samples: int, num_classes: int) -> np.ndarray:
    """The first global index whose `balanced_labels` class is c, for each c of `classes`: ceil(c N / C)."""
    return -(-np.asarray(classes, np.int64) * num_samples // num_classes)


def decode_fn(tokenizer_graph: nnx.GraphDef, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """(tokenizer params, tokenizer other state, codes [B, h, w]) -> uint8 images [B, H, W, 3]; jit it.

    One image at a time (lax.map): a batched decode rounds differently at different batch sizes (one uint8
    level here and there), a decode of one image gives the same pixels in any batch. With a mesh, each device
    decodes its own rows (the batch split over the data axes, as `sharding.data_sharding`).
    """

    def decode(params, rest, codes):
        model = nnx.merge(tokenizer_graph, params, rest)
        return jax.lax.map(lambda c: to_uint8(model.decode_codes(c[None]))[0], codes)

    if mesh is None:
        return decode
    batch = P(sharding.BATCH_AXES)
    return jax.shard_map(decode, mesh=mesh, in_specs=(P(), P(), batch), out_specs=batch)


class Painter:
    """Samples class-conditional images with a GPT and decodes them with its tokenizer.

    `config` gives the default settings and whether the sampler carries CFG's null-class rows; `guided=True`
    keeps them whatever the settings (the server: one compiled program for every request). With a `mesh`
    (and the logical-axis `rules`), rows are split over its data axes, and every process passes and gets back
    its own share of each batch; without one, arrays go where the models' parameters are.
    """

    def __init__(self, gpt: nnx.Module, tokenizer: nnx.Module, config: SamplingConfig, *,
                 guided: bool | None = None, mesh: jax.sharding.Mesh | None = None, rules=None):
        self.config = config
        self.guided = config.guided if guided is None else guided
        self.num_classes, self.grid, self.seq_len = gpt.config.num_classes, gpt.config.grid, gpt.config.seq_len
        self.mesh = mesh
        self._batch_sharding = None if mesh is None else sharding.data_sharding(mesh)
        gpt_graph, self._gpt_params = nnx.split(gpt)
        tok_graph, self._tok_params, self._tok_rest = nnx.split(tokenizer, nnx.Param, ...)
        start, advance = decoding_fns(gpt_graph, guided=self.guided)
        decode = decode_fn(tok_graph, mesh)

        def under_rules(fn):
            def traced(*args):
                with sharding.axis_rules(rules) if rules is not None else contextlib.nullcontext():
                    return fn(*args)
            return traced

        def advance_rows(params, state, labels, seeds, indices, settings, first, stop):
            return advance(params, state, labels, index_keys(seeds, indices), settings, first, stop)

        self._start = jax.jit(under_rules(start))
        self._advance = jax.jit(under_rules(advance_rows), donate_argnums=(1,))
        self._decode = jax.jit(under_rules(lambda params, rest, codes: decode(
            params, rest, codes.reshape(-1, self.grid, self.grid))))

    def __call__(self, labels, seeds, indices, settings: Settings | None = None, *,
                 progress: Callable[[int, int], None] | None = None,
                 segments: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Rows [B] (this process's share with a mesh): labels in 0 ... num_classes - 1, seeds, global sample
        indices, settings (None: `config`'s) -> (codes [B, N] int32, uint8 images [B, H, W, 3]) as numpy.

        The positions are sampled in `segments` calls of one compiled program, and `progress(done, N)` is called
        after each (the tokens are the same for any number of segments).
        """
        labels = check_labels(labels, self.num_classes)
        seeds, indices = np.asarray(seeds, np.int64), np.asarray(indices, np.int64)
        if ((seeds < 0) | (seeds >= MAX_SEED)).any():
            raise ValueError(f"seeds: must be in 0 ... {MAX_SEED - 1}, got {sorted(set(seeds.tolist()))[:4]}")
        settings = self.config.rows(labels.size) if settings is None else settings
        rows = [labels, seeds.astype(np.int32), indices.astype(np.int32), *settings]
        labels, seeds, indices, *settings = jax.tree.map(self._put, rows)
        settings = Settings(*settings)
        state = self._start(self._gpt_params, labels)
        bounds = np.linspace(0, self.seq_len, segments + 1).round().astype(int)
        for first, stop in zip(bounds[:-1], bounds[1:]):
            state = self._advance(self._gpt_params, state, labels, seeds, indices, settings, int(first), int(stop))
            if progress is not None:
                jax.block_until_ready(state[0])
                progress(int(stop), self.seq_len)
        codes = state[0]
        images = self._decode(self._tok_params, self._tok_rest, codes)
        return self._get(codes), self._get(images)

    def class_grid(self, classes: int, per_class: int, seed: int) -> np.ndarray:
        """uint8 [classes * per_class, H, W, 3]: row c holds `per_class` samples of class c (sample indices
        c * per_class + j of `seed`)."""
        labels = np.repeat(np.arange(classes, dtype=np.int32), per_class)
        return self(labels, np.full(labels.size, seed), np.arange(labels.size))[1]

    def _put(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.make_array_from_process_local_data(self._batch_sharding, x)

    def _get(self, x: jax.Array) -> np.ndarray:
        if self.mesh is None:
            return np.asarray(x)
        return np.asarray(multihost_utils.global_array_to_host_local_array(x, self.mesh, self._batch_sharding.spec))

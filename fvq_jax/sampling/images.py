"""The one sampling front end: class-conditional images from a GPT, decoded by its tokenizer, on one mesh.

`Painter` is what every caller uses: the sampling job (sampling/job.py), the server (fvq_jax/serving), the
GPT trainer's sample grids (`class_grid`) and the benchmarks. A batch is given as per-sample rows: label,
seed, global index and settings. Sample i of seed s draws from fold_in(key(s), i) (sampler.index_keys), so a
sample's codes depend on (seed, index, settings) only, never on the batch, its other rows, or the devices;
each image is decoded on its own (`per_image`), so its pixels do not depend on them either. It also encodes
images into codes (the server's encode and reconstruct).
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

from fvq_jax import config_lib, sharding
from fvq_jax.data.value_range import to_model_range, to_uint8
from fvq_jax.models.vqgan import VQGANArch
from fvq_jax.models.load import Loaded, load_recorded_tokenizer, load_tokenizer, saved_config
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


def decoding_tokenizer(path: str, gpt: Loaded, mesh_cfg, *, field: str) -> Loaded:
    """The tokenizer that decodes `gpt`'s codes: the one at `path` (a run or an export), else ("") the one recorded
    with the GPT. ConfigError naming `field` when none is recorded, or when `path`'s tokenizer has not the GPT's K
    codes or, where the GPT records the tokenizer that made its codes, not that one's downsampling (the GPT's token
    grid would decode into images of another size than it was trained on)."""
    record = gpt.config.get("codes", {}).get("tokenizer")
    if not path:
        config_lib.require(record is not None, field, f"the GPT in {gpt.source} records no tokenizer; name one (a run "
                           "or an export)")
        return load_recorded_tokenizer(record, mesh_cfg=mesh_cfg)
    tokenizer = load_tokenizer(path, mesh_cfg=mesh_cfg)
    codes, vocab = int(tokenizer.model.quantizer.num_codes), gpt.config.model.vocab_size
    config_lib.require(codes == vocab, field, f"{path} has K = {codes} codes and the GPT predicts {vocab}")
    if record is not None:
        grid, factor = gpt.config.model.grid, tokenizer.model.arch.downsample_factor
        made = VQGANArch.from_config(saved_config(record["path"], record.get("step")).model, "model").downsample_factor
        config_lib.require(factor == made, field,
                           f"{path} decodes the GPT's {grid} x {grid} token grid into {grid * factor} x "
                           f"{grid * factor} images (downsampling {factor}); the tokenizer that made its codes "
                           f"({record['path']}) into {grid * made} x {grid * made}")
    return tokenizer


def per_image(fn: Callable, graph: nnx.GraphDef, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """(tokenizer params, other state, x [B, ...]) -> fn(tokenizer, x[i:i+1])[0] for each i, stacked; jit it.

    One image at a time (lax.map): a batched decode rounds differently at different batch sizes (one uint8
    level here and there), one image alone gives the same pixels in any batch. With a mesh, each device takes
    its own rows (the batch split over the data axes, as `sharding.data_sharding`).
    """

    def run(params, rest, x):
        model = nnx.merge(graph, params, rest)
        return jax.lax.map(lambda one: fn(model, one[None])[0], x)

    if mesh is None:
        return run
    batch = P(sharding.BATCH_AXES)
    return jax.shard_map(run, mesh=mesh, in_specs=(P(), P(), batch), out_specs=batch)


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
        self.codebook_size = gpt.config.vocab_size
        self.mesh = mesh
        self._batch_sharding = None if mesh is None else sharding.data_sharding(mesh)
        gpt_graph, self._gpt_params = nnx.split(gpt)
        tok_graph, self._tok_params, self._tok_rest = nnx.split(tokenizer, nnx.Param, ...)
        start, advance = decoding_fns(gpt_graph, guided=self.guided)
        decode = per_image(lambda model, z_q: to_uint8(model.decode(z_q)), tok_graph, mesh)
        encode = per_image(lambda model, images: model.encode(to_model_range(images))[1], tok_graph, mesh)
        self.image_size = self.grid * tokenizer.arch.downsample_factor

        def under_rules(fn):
            def traced(*args):
                with sharding.axis_rules(rules) if rules is not None else contextlib.nullcontext():
                    return fn(*args)
            return traced

        def advance_rows(params, state, labels, seeds, indices, settings, first, stop):
            return advance(params, state, labels, index_keys(seeds, indices), settings, first, stop)

        self._start = jax.jit(under_rules(start))
        self._advance = jax.jit(under_rules(advance_rows), donate_argnums=(1,))

        def decode_codes(params, rest, codes):
            # The codebook lookup (an FVQ tokenizer runs its bridge over all K codes) once for the batch; a gather,
            # exact whatever the batch.
            z_q = nnx.merge(tok_graph, params, rest).quantizer.lookup(codes.reshape(-1, self.grid, self.grid))
            return decode(params, rest, z_q)

        self._decode = jax.jit(under_rules(decode_codes))
        self._encode = jax.jit(under_rules(lambda params, rest, images: encode(params, rest, images).reshape(
            images.shape[0], self.seq_len).astype(jnp.int32)))

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

    def decode(self, codes) -> np.ndarray:
        """codes [B, N] (this process's rows) -> uint8 images [B, H, W, 3]."""
        return self._get(self._decode(self._tok_params, self._tok_rest, self._put(np.asarray(codes, np.int32))))

    def encode(self, images) -> np.ndarray:
        """uint8 images [B, S, S, 3], S = image_size (this process's rows) -> the tokenizer's codes [B, N] int32."""
        return self._get(self._encode(self._tok_params, self._tok_rest, self._put(np.asarray(images, np.uint8))))

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

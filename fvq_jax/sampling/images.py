"""From sampled codes to images: decoding through the tokenizer, class-balanced labels, sample grids."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fvq_jax.data.value_range import to_uint8
from fvq_jax.sampling.sampler import SamplingConfig, generation_fn, sample_keys


def balanced_labels(indices, num_samples: int, num_classes: int) -> np.ndarray:
    """The class of each global sample index: floor(i * C / N), so every class gets N / C samples (+-1) in
    contiguous runs, whatever batch or device a sample lands on."""
    indices = np.asarray(indices, np.int64)
    return (indices * num_classes // num_samples).astype(np.int32)


def decode_fn(tokenizer_graph: nnx.GraphDef) -> Callable:
    """(tokenizer params, tokenizer other state, codes [B, h, w]) -> uint8 images [B, H, W, 3]; jit it."""

    def decode(params, rest, codes):
        return to_uint8(nnx.merge(tokenizer_graph, params, rest).decode_codes(codes))

    return decode


class Painter:
    """Samples class-conditional images with a GPT and decodes them with its tokenizer (both on one mesh)."""

    def __init__(self, gpt: nnx.Module, tokenizer: nnx.Module, config: SamplingConfig):
        self.grid = gpt.config.grid
        gpt_graph, self.gpt_params = nnx.split(gpt)
        tok_graph, self.tok_params, self.tok_rest = nnx.split(tokenizer, nnx.Param, ...)
        self._generate = jax.jit(generation_fn(gpt_graph, config))
        self._decode = jax.jit(decode_fn(tok_graph))

    def codes(self, labels: np.ndarray, keys: jax.Array) -> jax.Array:
        """labels [B], per-sample keys [B] -> codes [B, N] int32."""
        return self._generate(self.gpt_params, jnp.asarray(labels, jnp.int32), keys)

    def images(self, codes: jax.Array) -> jax.Array:
        """codes [B, N] -> uint8 [B, H, W, 3]."""
        return self._decode(self.tok_params, self.tok_rest, codes.reshape(codes.shape[0], self.grid, self.grid))

    def class_grid(self, classes: int, per_class: int, seed: int) -> np.ndarray:
        """uint8 [classes * per_class, H, W, 3]: row c holds `per_class` samples of class c (sample indices
        c * per_class + j of `seed`)."""
        labels = np.repeat(np.arange(classes, dtype=np.int32), per_class)
        keys = sample_keys(seed, 0, labels.size)
        return np.asarray(jax.device_get(self.images(self.codes(labels, keys))))

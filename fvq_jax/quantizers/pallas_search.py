"""Nearest-code search fused into one Pallas kernel: z . e for a tile of codes and a running
min / argmin, so the [N, K] distances never leave the chip's registers / VMEM.

Every tile computes the distances exactly as `ops.nearest_code` does, ||z||^2 + ||e||^2 - 2 z.e
in float32 from the same norms, keeps the first code of the tile that attains the tile's minimum,
and replaces the running best only with a strictly smaller distance, so ties go to the lowest
index as in `ops.nearest_code`. Two layouts of that step:

- "loop" (GPUs, lowered with Triton): one program per block of tokens walks the codebook in
  tiles of `block_codes`, the running min / argmin held in registers; the codebook is read
  once per token block.
- "grid" (TPUs, lowered with Mosaic): a (token blocks, code tiles) grid whose code axis runs in
  order on one core; the running min / argmin live in VMEM scratch, and the indices are written
  after the last tile. Pallas pipelines the code tiles from HBM.

Elsewhere (the CPU) the kernel runs in Pallas interpret mode: exact, but no speed figure.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

Layout = Literal["loop", "grid"]
LAYOUTS = ("loop", "grid")

# (tokens, codes) per block. Sized for D = 256 (untuned: no accelerator was at hand); the TPU
# code tile is a multiple of 128 lanes, the Triton blocks powers of two.
BLOCKS = {"gpu": (64, 64), "tpu": (256, 1024), "cpu": (128, 256)}


def _products(z: jax.Array, codes: jax.Array, precision: str) -> jax.Array:
    """z . e for a block: [bt, D] x [bc, D] -> [bt, bc] float32 ('fp32', 'tf32' or 'bf16', as
    `ops.inner_products`: float32 accumulation in every case)."""
    if precision == "bf16":
        z, codes, matmul_precision = z.astype(jnp.bfloat16), codes.astype(jnp.bfloat16), None
    else:
        # A bf16 codebook is read by its exact float32 values.
        z, codes = z.astype(jnp.float32), codes.astype(jnp.float32)
        matmul_precision = jax.lax.Precision.HIGHEST if precision == "fp32" else jax.lax.Precision.DEFAULT
    return jnp.dot(z, codes.T, precision=matmul_precision, preferred_element_type=jnp.float32)


def _tile_step(z, z_sq, codes, codes_sq, offset, best_d, best_i, precision):
    """Fold one code tile into the running (min distance, index): z [bt, D], z_sq [bt, 1],
    codes [bc, D], codes_sq [1, bc], best_d [bt, 1] float32, best_i [bt, 1] int32."""
    d = z_sq + codes_sq - 2.0 * _products(z, codes, precision)
    m = jnp.min(d, axis=1, keepdims=True)
    # The first column attaining the minimum (min of a masked iota: no argmin needed in the kernel).
    cols = jnp.arange(d.shape[1], dtype=jnp.int32)[None, :]
    i = jnp.min(jnp.where(d == m, cols, d.shape[1]), axis=1, keepdims=True)
    better = m < best_d  # strictly: an equal distance in a later tile keeps the lower index
    return jnp.where(better, m, best_d), jnp.where(better, i + offset, best_i)


def _loop_kernel(z_ref, z_sq_ref, codes_ref, codes_sq_ref, idx_ref, *, block_codes, num_tiles, precision):
    z, z_sq = z_ref[...], z_sq_ref[...]

    def tile(t, carry):
        rows = pl.ds(t * block_codes, block_codes)
        return _tile_step(z, z_sq, codes_ref[rows, :], codes_sq_ref[:, rows], t * block_codes, *carry, precision)

    init = (jnp.full(z_sq.shape, jnp.inf, jnp.float32), jnp.zeros(z_sq.shape, jnp.int32))
    _, best_i = jax.lax.fori_loop(0, num_tiles, tile, init)
    idx_ref[...] = best_i


def _grid_kernel(z_ref, z_sq_ref, codes_ref, codes_sq_ref, idx_ref, best_d_ref, best_i_ref, *, block_codes,
                 precision):
    t = pl.program_id(1)

    @pl.when(t == 0)
    def _():
        best_d_ref[...] = jnp.full(best_d_ref.shape, jnp.inf, jnp.float32)
        best_i_ref[...] = jnp.zeros(best_i_ref.shape, jnp.int32)

    best_d, best_i = _tile_step(z_ref[...], z_sq_ref[...], codes_ref[...], codes_sq_ref[...], t * block_codes,
                                best_d_ref[...], best_i_ref[...], precision)
    best_d_ref[...] = best_d
    best_i_ref[...] = best_i

    @pl.when(t == pl.num_programs(1) - 1)
    def _():
        idx_ref[...] = best_i


def nearest_code(
    z: jax.Array,
    z_sq: jax.Array,
    codebook: jax.Array,
    codes_sq: jax.Array,
    *,
    precision: str = "fp32",
    block_tokens: int | None = None,
    block_codes: int | None = None,
    layout: Layout | None = None,
    interpret: bool | None = None,
    platform: str | None = None,
) -> jax.Array:
    """Index of the nearest code for every token; ties go to the lowest index.

    Args:
      z: [N, D] tokens; z_sq: [N] their squared norms (float32).
      codebook: [K, D] codes (float32 or bfloat16); codes_sq: [K] their squared norms (float32).
      precision: 'fp32' | 'tf32' | 'bf16' products, float32 accumulation.
      block_tokens, block_codes: the kernel's block (default: BLOCKS for the backend).
      layout: 'loop' | 'grid' (default: 'grid' on TPUs, 'loop' elsewhere).
      interpret: run in Pallas interpret mode (default: on platforms other than GPU / TPU).
      platform: 'gpu' | 'tpu' | 'cpu' to lower for (default: jax.default_backend()); lets a host
        without the accelerator export the kernel for it.
    Returns:
      indices: [N] int32. Callers stop gradients; the kernel has no derivative.
    """
    backend = platform or jax.default_backend()
    default_tokens, default_codes = BLOCKS.get(backend, BLOCKS["cpu"])
    block_tokens = block_tokens or default_tokens
    block_codes = block_codes or default_codes
    layout = layout or ("grid" if backend == "tpu" else "loop")
    if layout not in LAYOUTS:
        raise ValueError(f"pallas search layout must be one of {LAYOUTS}, got {layout!r}")
    if interpret is None:
        interpret = backend not in ("gpu", "tpu")
    num_tokens, dim = z.shape
    num_codes = codebook.shape[0]
    if backend == "gpu" and not interpret and (dim < 16 or dim & (dim - 1)):
        raise ValueError(f"the Triton search kernel needs a code width D that is a power of two >= 16, got {dim}")
    if precision == "bf16":  # cast once, not per tile (the same values the kernel would cast to)
        z, codebook = z.astype(jnp.bfloat16), codebook.astype(jnp.bfloat16)
    n_pad = math.ceil(num_tokens / block_tokens) * block_tokens
    k_pad = math.ceil(num_codes / block_codes) * block_codes
    num_tiles = k_pad // block_codes
    # Padded tokens are dropped at the end; padded codes have infinite norm, so they never win.
    z = jnp.pad(z, ((0, n_pad - num_tokens), (0, 0)))
    z_sq = jnp.pad(z_sq.astype(jnp.float32), (0, n_pad - num_tokens)).reshape(n_pad, 1)
    codebook = jnp.pad(codebook, ((0, k_pad - num_codes), (0, 0)))
    codes_sq = jnp.pad(codes_sq.astype(jnp.float32), (0, k_pad - num_codes), constant_values=jnp.inf)
    codes_sq = codes_sq.reshape(1, k_pad)
    out_shape = jax.ShapeDtypeStruct((n_pad, 1), jnp.int32)

    if layout == "loop":
        call = pl.pallas_call(
            functools.partial(_loop_kernel, block_codes=block_codes, num_tiles=num_tiles, precision=precision),
            grid=(n_pad // block_tokens,),
            in_specs=[pl.BlockSpec((block_tokens, dim), lambda i: (i, 0)),
                      pl.BlockSpec((block_tokens, 1), lambda i: (i, 0)),
                      pl.BlockSpec((k_pad, dim), lambda i: (0, 0)),
                      pl.BlockSpec((1, k_pad), lambda i: (0, 0))],
            out_specs=pl.BlockSpec((block_tokens, 1), lambda i: (i, 0)),
            out_shape=out_shape,
            compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2) if backend == "gpu" else None,
            interpret=interpret,
            name="nearest_code_loop")
    else:
        call = pl.pallas_call(
            functools.partial(_grid_kernel, block_codes=block_codes, precision=precision),
            grid=(n_pad // block_tokens, num_tiles),
            in_specs=[pl.BlockSpec((block_tokens, dim), lambda i, t: (i, 0)),
                      pl.BlockSpec((block_tokens, 1), lambda i, t: (i, 0)),
                      pl.BlockSpec((block_codes, dim), lambda i, t: (t, 0)),
                      pl.BlockSpec((1, block_codes), lambda i, t: (0, t))],
            out_specs=pl.BlockSpec((block_tokens, 1), lambda i, t: (i, 0)),
            out_shape=out_shape,
            scratch_shapes=[pltpu.VMEM((block_tokens, 1), jnp.float32), pltpu.VMEM((block_tokens, 1), jnp.int32)],
            compiler_params=(pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))
                             if backend == "tpu" else None),
            interpret=interpret,
            name="nearest_code_grid")
    return call(z, z_sq, codebook, codes_sq)[:num_tokens, 0]

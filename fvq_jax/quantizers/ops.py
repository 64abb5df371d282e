"""Quantizer math as pure functions: distances, nearest-code search, straight-through, losses.

Everything here works on flat token matrices `z: [N, D]` against a codebook `codebook: [K, D]`
and runs in float32 whatever the model's compute dtype; the modules in this package reshape
and call these. A bfloat16 codebook (a bridge run in bf16) is taken as it is: its values are
exact in float32, so every result equals that of its float32 copy, which these functions never
ask for whole (the casts sit where the values are used).

The nearest-code search comes in three forms with identical results:
- naive: builds the [N, K] distance matrix (fastest for small K, memory N x K);
- tiled: scans over tiles of `tile_size` codes (and chunks of `token_chunk` tokens) keeping a
  running min / argmin, so memory is O(N x tile_size) whatever K is;
- pallas (impl='pallas'): one fused kernel keeps the running min / argmin on chip, so no
  distances reach memory at all (`pallas_search`).
None needs a backward pass: indices are integers, and the gradient of `codebook[indices]`
is a scatter-add into the K rows, so no N x K matrix exists in the backward pass either.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from fvq_jax.quantizers import pallas_search

Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS = ("fp32", "tf32", "bf16")
SearchImpl = Literal["xla", "pallas"]
SEARCH_IMPLS = ("xla", "pallas")


def cast_codebook(codebook: jax.Array, precision: Precision) -> jax.Array:
    """The codebook as the search's products read it (bf16 products cast it once, up front)."""
    return codebook.astype(jnp.bfloat16) if precision == "bf16" else codebook


def search_dtype(x: jax.Array) -> jax.Array:
    """x as the search reads it: bfloat16 stays (cast exactly where it is used), anything else float32."""
    return x if x.dtype == jnp.bfloat16 else x.astype(jnp.float32)


def inner_products(z: jax.Array, codebook: jax.Array, precision: Precision = "fp32") -> jax.Array:
    """z . e for every token and code: [N, D] x [K, D] -> [N, K] float32.

    'fp32' asks for full float32 products, 'tf32' for the backend's default float32 matmul
    (TF32 on NVIDIA GPUs), 'bf16' for bfloat16 inputs with float32 accumulation.
    """
    if precision == "bf16":
        return jnp.dot(
            z.astype(jnp.bfloat16),
            codebook.astype(jnp.bfloat16).T,
            preferred_element_type=jnp.float32,
        )
    matmul_precision = jax.lax.Precision.HIGHEST if precision == "fp32" else jax.lax.Precision.DEFAULT
    return jnp.dot(z, codebook.T, precision=matmul_precision, preferred_element_type=jnp.float32)


def squared_norms(x: jax.Array) -> jax.Array:
    """||x||^2 over the last axis in float32: [..., D] -> [...]."""
    x = x.astype(jnp.float32)
    return jnp.sum(x * x, axis=-1)


def squared_distances(z: jax.Array, codebook: jax.Array, precision: Precision = "fp32") -> jax.Array:
    """||z||^2 + ||e||^2 - 2 z.e for every token and code: [N, D], [K, D] -> [N, K] float32."""
    return _distances(z, squared_norms(z), codebook, squared_norms(codebook), precision)


def _distances(z, z_sq, codebook, codes_sq, precision):
    # One formula for the naive and the tiled search, so both give bit-identical values.
    return z_sq[:, None] + codes_sq[None, :] - 2.0 * inner_products(z, codebook, precision)


def nearest_code(
    z: jax.Array,
    codebook: jax.Array,
    *,
    precision: Precision = "fp32",
    tile_size: int | None = None,
    token_chunk: int | None = None,
    impl: SearchImpl = "xla",
) -> jax.Array:
    """Index of the nearest code (squared L2) for every token; ties go to the lowest index.

    Args:
      z: [N, D] tokens.
      codebook: [K, D] codes (float32, or bfloat16 searched by its exact float32 values).
      precision: 'fp32' | 'tf32' | 'bf16' (products only; norms and sums stay float32).
      tile_size: codes per tile; None (or >= K) searches the whole codebook at once.
      token_chunk: tokens per chunk when tiling; None processes all N tokens per tile.
      impl: 'xla' (naive or tiled, as tile_size says) or 'pallas' (the fused kernel, which picks
        its own blocks and ignores tile_size and token_chunk).
    Returns:
      indices: [N] int32. No gradient flows through the search.
    """
    if impl not in SEARCH_IMPLS:
        raise ValueError(f"search impl must be one of {SEARCH_IMPLS}, got {impl!r}")
    z = jax.lax.stop_gradient(z.astype(jnp.float32))
    codebook = jax.lax.stop_gradient(search_dtype(codebook))
    num_codes = codebook.shape[0]
    if tile_size is not None and tile_size <= 0:
        raise ValueError(f"search tile_size must be positive, got {tile_size}")
    if token_chunk is not None and token_chunk <= 0:
        raise ValueError(f"search token_chunk must be positive, got {token_chunk}")
    if impl == "pallas":
        return pallas_search.nearest_code(z, squared_norms(z), codebook, squared_norms(codebook), precision=precision)
    if tile_size is None or tile_size >= num_codes:
        d = squared_distances(z, codebook, precision)
        return jnp.argmin(d, axis=-1).astype(jnp.int32)
    return _nearest_code_tiled(z, codebook, precision, tile_size, token_chunk)


def _nearest_code_tiled(z, codebook, precision, tile_size, token_chunk):
    num_tokens, dim = z.shape
    num_codes = codebook.shape[0]
    num_tiles = math.ceil(num_codes / tile_size)
    pad = num_tiles * tile_size - num_codes
    codes_sq = jnp.pad(squared_norms(codebook), (0, pad), constant_values=jnp.inf)
    codes_sq = codes_sq.reshape(num_tiles, tile_size)
    # Padded codes have infinite norm, so they never win.
    tiles = jnp.pad(cast_codebook(codebook, precision), ((0, pad), (0, 0)))
    tiles = tiles.reshape(num_tiles, tile_size, dim)
    offsets = jnp.arange(num_tiles, dtype=jnp.int32) * tile_size

    def search(z_chunk):
        z_sq = squared_norms(z_chunk)

        def scan_tile(carry, tile):
            best_d, best_i = carry
            codes, sq, offset = tile
            d = _distances(z_chunk, z_sq, codes, sq, precision)
            i = jnp.argmin(d, axis=-1)
            m = jnp.take_along_axis(d, i[:, None], axis=-1)[:, 0]
            # Strictly smaller: an equal distance in a later tile keeps the earlier (lower) index.
            better = m < best_d
            return (jnp.where(better, m, best_d), jnp.where(better, i.astype(jnp.int32) + offset, best_i)), None

        n = z_chunk.shape[0]
        init = (jnp.full((n,), jnp.inf, jnp.float32), jnp.zeros((n,), jnp.int32))
        (_, best_i), _ = jax.lax.scan(scan_tile, init, (tiles, codes_sq, offsets))
        return best_i

    if token_chunk is None or token_chunk >= num_tokens:
        return search(z)
    num_chunks = math.ceil(num_tokens / token_chunk)
    z_padded = jnp.pad(z, ((0, num_chunks * token_chunk - num_tokens), (0, 0)))
    indices = jax.lax.map(search, z_padded.reshape(num_chunks, token_chunk, dim))
    return indices.reshape(-1)[:num_tokens]


@jax.custom_vjp
def straight_through(z: jax.Array, z_q: jax.Array) -> jax.Array:
    """Forward: z_q. Backward: the incoming gradient goes to z unchanged, nothing to z_q.

    The codebook is trained only by the codebook loss, never through this estimator.
    """
    return z_q


def _straight_through_fwd(z, z_q):
    return z_q, None


def _straight_through_bwd(_, g):
    return g, jnp.zeros_like(g)


straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def codebook_loss(z: jax.Array, z_q: jax.Array) -> jax.Array:
    """mean((z_q - sg(z))^2): moves the selected codes (and whatever produced them) to z."""
    return jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z)))


def commitment_loss(z: jax.Array, z_q: jax.Array) -> jax.Array:
    """mean((sg(z_q) - z)^2), unweighted: keeps the encoder close to its codes."""
    return jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z))


def entropy_loss(z: jax.Array, codebook: jax.Array, temperature: float = 0.01,
                 precision: Precision = "fp32") -> jax.Array:
    """Per-token entropy minus batch-average entropy of softmax(-distance / temperature).

    Low when each token is confident and the batch spreads over many codes. Builds the
    [N, K] matrix, so it is only evaluated when its weight is non-zero.
    """
    logits = -squared_distances(z, codebook, precision) / temperature
    probs = jax.nn.softmax(logits, axis=-1)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
    avg_probs = jnp.mean(probs, axis=0)
    avg_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + 1e-5))
    return sample_entropy - avg_entropy


def code_counts(indices: jax.Array, num_codes: int) -> jax.Array:
    """How often each code occurs in `indices` (any shape): -> [K] int32."""
    return jnp.zeros((num_codes,), jnp.int32).at[indices.reshape(-1)].add(1, mode="drop")


def perplexity(indices: jax.Array, num_codes: int) -> jax.Array:
    """exp(entropy) of the code histogram of `indices`: 1 (one code) .. K (uniform)."""
    counts = code_counts(indices, num_codes).astype(jnp.float32)
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / ||x|| over the last axis."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def quantize(
    z: jax.Array,
    codebook: jax.Array,
    *,
    beta: float = 0.25,
    entropy_weight: float = 0.0,
    entropy_temperature: float = 0.01,
    l2_norm: bool = False,
    precision: Precision = "fp32",
    tile_size: int | None = None,
    token_chunk: int | None = None,
    impl: SearchImpl = "xla",
) -> dict[str, jax.Array]:
    """Quantize tokens against a codebook, with the VQ losses.

    Args:
      z: [..., D] encoder features (any leading shape), cast to float32.
      codebook: [K, D] codes (already produced by the projector): float32, or bfloat16 (exact in
        float32; no float32 copy of the whole codebook is made for the search).
      beta: commitment weight.
      entropy_weight: weight of `entropy_loss` (0 skips its N x K matrix).
      l2_norm: search and quantize on the unit sphere (LlamaGen-style codes).
      precision, tile_size, token_chunk, impl: how the nearest code is found (`nearest_code`).
    Returns a dict:
      z_q: [..., D] quantized features, straight-through (gradient to z as identity);
      indices: [...] int32;
      codebook_loss, commitment_loss (already times beta), entropy_loss (already times its
      weight), loss (their sum), perplexity: scalars.
    """
    lead_shape, dim = z.shape[:-1], z.shape[-1]
    if codebook.ndim != 2 or codebook.shape[1] != dim:
        raise ValueError(f"codebook must be [K, {dim}] to match z [..., {dim}], got {codebook.shape}")
    z = z.astype(jnp.float32).reshape(-1, dim)
    codebook = search_dtype(codebook)
    if l2_norm:
        z = l2_normalize(z)
        codebook = l2_normalize(codebook.astype(jnp.float32))
    indices = nearest_code(z, codebook, precision=precision, tile_size=tile_size, token_chunk=token_chunk,
                           impl=impl)
    # Gathered (and, backward, scatter-added) in float32; the cast fuses into the gather.
    codes = jnp.take(codebook.astype(jnp.float32), indices, axis=0)
    cb_loss = codebook_loss(z, codes)
    commit = beta * commitment_loss(z, codes)
    if entropy_weight:
        ent = entropy_weight * entropy_loss(z, codebook, entropy_temperature, precision)
    else:
        ent = jnp.zeros((), jnp.float32)
    return {
        "z_q": straight_through(z, codes).reshape(*lead_shape, dim),
        "indices": indices.reshape(lead_shape),
        "codebook_loss": cb_loss,
        "commitment_loss": commit,
        "entropy_loss": ent,
        "loss": cb_loss + commit + ent,
        "perplexity": perplexity(indices, codebook.shape[0]),
    }

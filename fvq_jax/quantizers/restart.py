"""Bringing dead codes back: quantizer.restart='pull' (not in the paper; off by default).

At small token throughput FVQ loses single codes while the learning rate anneals: a code that
stops being any token's nearest gets no gradient of its own, and once the shared network moves
slowly nothing brings it back (configs/sweeps/results/revive.md). The pull gives it one: in every
training step each dead code (no assignment in the usage window) is pulled toward its nearest
token of the batch by a codebook-loss term, as hard as if that token had picked it. The gradient
reaches the code only through the projector, like every other code's: there is no per-code state,
and every code is still the shared network's output. It is part of the train step (the program
changes when it is on, not when it is off) and reads only the usage window, which is checkpointed.

A rejected candidate, 'split' (every 25 steps move each dead code onto a busy one through a fixed
per-code offset added to the projector's output), is measured in revive.md (commit d824952): the
moved codes drifted away from the data as the shared network moved under their fixed offsets.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fvq_jax.quantizers import ops

PULL_CODE_CHUNK = 4096  # codes per block of the code -> nearest token search ([chunk, N] distances at a time)


def window_counts(window: jax.Array, num_codes: int) -> jax.Array:
    """[K] int32 assignments per code in the usage window (empty slots, -1, are not counted)."""
    return ops.code_counts(jnp.where(window >= 0, window, num_codes), num_codes)  # out of range: dropped


def dead_codes(window: jax.Array, num_codes: int) -> jax.Array:
    """[K] bool: codes with no assignment in the usage window, once every slot is written (before
    that, nothing counts as dead)."""
    return jnp.all(window >= 0) & (window_counts(window, num_codes) == 0)


def nearest_tokens(codes: jax.Array, tokens: jax.Array, precision: ops.Precision = "fp32") -> jax.Array:
    """[K] int32: each code's nearest token (ties to the lowest index), PULL_CODE_CHUNK codes at a time."""
    num_codes, dim = codes.shape
    search = functools.partial(ops.nearest_code, codebook=tokens, precision=precision)
    if num_codes <= PULL_CODE_CHUNK:
        return search(codes)
    blocks = -(-num_codes // PULL_CODE_CHUNK)
    padded = jnp.pad(codes, ((0, blocks * PULL_CODE_CHUNK - num_codes), (0, 0)))
    return jax.lax.map(search, padded.reshape(blocks, PULL_CODE_CHUNK, dim)).reshape(-1)[:num_codes]


def pull_loss(z: jax.Array, codebook: jax.Array, dead: jax.Array, *, l2_norm: bool = False,
              precision: ops.Precision = "fp32") -> jax.Array:
    """sum over dead codes n of ||codebook[n] - sg(z[t(n)])||^2 / (max(dead codes, N) * D), t(n) = the
    token nearest to n.

    z: [N, D] the batch's tokens; codebook: [K, D] the searched codes (gradient flows into them);
    dead: [K] bool. While there are at most N dead codes the normalisation is the codebook loss's
    (mean over N tokens x D): a dead code is pulled as hard as a code that one token picked. With more
    dead codes than tokens the pull is shared out, so that in all it never outweighs the batch's
    codebook loss (uncapped, 13,000 dead codes at K = 16,384 against 512 tokens pulled the whole
    codebook onto a few tokens: revive.md). With l2_norm both sides are unit vectors.
    """
    tokens = jax.lax.stop_gradient(z.astype(jnp.float32))
    codes = codebook.astype(jnp.float32)
    if l2_norm:
        tokens, codes = ops.l2_normalize(tokens), ops.l2_normalize(codes)
    nearest = nearest_tokens(codes, tokens, precision)
    target = jnp.take(tokens, nearest, axis=0)
    squared = jnp.sum(jnp.square(codes - target), axis=-1)
    num_tokens, dim = tokens.shape
    return jnp.sum(jnp.where(dead, squared, 0.0)) / (jnp.maximum(jnp.sum(dead), num_tokens) * dim)


FAR = 1e6  # where live codes sit for the search among dead codes only: no token is ever nearer to them


def claim_loss(z: jax.Array, codebook: jax.Array, dead: jax.Array, *, l2_norm: bool = False,
               precision: ops.Precision = "fp32", tile_size: int | None = None) -> jax.Array:
    """sum over tokens t of [d(t) dead] ||codebook[d(t)] - sg(z[t])||^2 / (N * D), d(t) = the dead code
    nearest to token t.

    The other direction of `pull_loss`: every token also picks its nearest dead code, which is pulled
    toward it as if the token had picked it in the search. At most N dead codes move per step, each
    toward the tokens nearest to it, so many dead codes are never pulled onto the same few tokens,
    and the whole term is never larger than the batch's codebook loss.
    """
    tokens = jax.lax.stop_gradient(z.astype(jnp.float32))
    codes = codebook.astype(jnp.float32)
    if l2_norm:
        tokens, codes = ops.l2_normalize(tokens), ops.l2_normalize(codes)
    searched = jnp.where(dead[:, None], jax.lax.stop_gradient(codes), FAR)
    nearest = ops.nearest_code(tokens, searched, precision=precision, tile_size=tile_size)
    claimed = jnp.take(codes, nearest, axis=0)
    squared = jnp.sum(jnp.square(claimed - tokens), axis=-1)
    return jnp.sum(jnp.where(jnp.take(dead, nearest), squared, 0.0)) / tokens.size

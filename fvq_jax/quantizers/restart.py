"""Bringing dead codes back (quantizer.restart; not in the paper, off by default): 'split' and 'pull'.

At small token throughput FVQ loses single codes while the learning rate anneals: a code that
stops being anyone's nearest gets no gradient of its own, and once the shared network moves
slowly nothing brings it back (configs/sweeps/results/revive.md). The restart gives such a code
a new place: every `restart_every` steps each code with no assignment in the (full) usage window
is moved onto a busy code, chosen with probability proportional to its assignments in the window,
plus Gaussian noise of `noise` x that code's RMS, so that the busy code's tokens split between
the two and the restarted code is selected from the next step on.

The searched codebook is projector(E) and one code cannot be moved through E or the bridge alone
(a raw entry feeds a whole patch of codes), so a restart-enabled quantizer keeps a per-code
offset [K, D] (`CodeOffset`) added to the projector's output. It is model state, not a parameter:
zero at the start, written only by the restart, never by gradients. A restarted code keeps
learning through the shared network like every other code; its offset only moved its start.
The restart runs outside the train step (a periodic update of the state in train.tokenizer) and
depends only on the checkpointed state and the step, so a resumed run repeats it exactly.

'pull' (`pull_loss`) stays inside FVQ's parametrisation instead: no per-code state, every code is
still the shared network's output. In every training step each dead code (no assignment in the
usage window) is pulled toward its nearest token of the batch by a codebook-loss term, as if that
token had picked it; the gradient reaches the code only through the projector, like every other
code's. It is part of the train step (the step program changes when it is on, not when off).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.tree_util import DictKey

from fvq_jax.quantizers import ops

# Where the offsets sit in the tokenizer's model state.
OFFSET_PATH = ("quantizer", "code_offset")


class CodeOffset(nnx.Variable):
    """Model state of a restart-enabled quantizer: per-code offsets [K, D] added to the projector's output."""


def window_counts(window: jax.Array, num_codes: int) -> jax.Array:
    """[K] int32 assignments per code in the usage window (empty slots, -1, are not counted)."""
    return ops.code_counts(jnp.where(window >= 0, window, num_codes), num_codes)  # out of range: dropped


def dead_codes(window: jax.Array, num_codes: int) -> jax.Array:
    """[K] bool: codes with no assignment in the usage window, once every slot is written (before
    that, nothing counts as dead)."""
    return jnp.all(window >= 0) & (window_counts(window, num_codes) == 0)


def split_offsets(codes: jax.Array, offset: jax.Array, window: jax.Array, key: jax.Array, noise: float
                  ) -> tuple[jax.Array, jax.Array]:
    """New offsets that move every dead code onto a busy one; returns (offset, dead [K] bool).

    codes: [K, D] the searched codes before any normalisation (projector output + `offset`).
    Each dead code n takes a source m drawn with probability proportional to m's assignments in
    `window`, and offset[n] becomes offset[n] + codes[m] - codes[n] + noise, so code n lands on
    codes[m] plus noise of `noise` x RMS(codes[m]). Live codes keep their offsets bit for bit.
    """
    num_codes = codes.shape[0]
    dead = dead_codes(window, num_codes)
    counts = window_counts(window, num_codes).astype(jnp.float32)
    source_key, noise_key = jax.random.split(key)
    sources = jax.random.categorical(source_key, jnp.log(counts), shape=(num_codes,))
    target = jnp.take(codes, sources, axis=0)
    scale = noise * jnp.sqrt(jnp.mean(jnp.square(target), axis=-1, keepdims=True))
    target = target + scale * jax.random.normal(noise_key, codes.shape, codes.dtype)
    return jnp.where(dead[:, None], offset + target - codes, offset), dead


PULL_CODE_CHUNK = 4096  # codes per block of the code -> nearest token search ([chunk, N] distances at a time)


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
    """sum over dead codes n of ||codebook[n] - sg(z[t(n)])||^2 / (N * D), t(n) = the token nearest to n.

    z: [N, D] the batch's tokens; codebook: [K, D] the searched codes (gradient flows into them);
    dead: [K] bool. The normalisation is the codebook loss's (mean over N tokens x D), so a dead code
    is pulled as hard as a code that one token picked. With l2_norm both sides are unit vectors.
    """
    tokens = jax.lax.stop_gradient(z.astype(jnp.float32))
    codes = codebook.astype(jnp.float32)
    if l2_norm:
        tokens, codes = ops.l2_normalize(tokens), ops.l2_normalize(codes)
    nearest = nearest_tokens(codes, tokens, precision)
    target = jnp.take(tokens, nearest, axis=0)
    squared = jnp.sum(jnp.square(codes - target), axis=-1)
    return jnp.sum(jnp.where(dead, squared, 0.0)) / tokens.size


def restart_dead_codes(state, step: jax.Array, *, graph: nnx.GraphDef, noise: float, seed: int
                       ) -> tuple[Any, jax.Array]:
    """Split busy codes onto the dead codes of a tokenizer's quantizer (see module doc).

    state: a TrainState whose model is the tokenizer (`graph` merges it); its quantizer must have
    been built with code offsets. The noise and the choice of sources come from
    fold_in(key(seed), step). Returns (state with new offsets in model_state, dead [K] bool: the
    codes restarted). Parameters, optimizer state and EMA are untouched.
    """
    quantizer = nnx.merge(graph, state.params, state.model_state).quantizer
    offset = quantizer.code_offset[...]
    codes = quantizer.unnormalized_codebook().astype(jnp.float32)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), 1)
    new_offset, dead = split_offsets(codes, offset, quantizer.usage_buffer[...], key, noise)

    def visit(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, DictKey))
        return new_offset if keys == OFFSET_PATH else leaf
    return state.replace(model_state=jax.tree_util.tree_map_with_path(visit, state.model_state)), dead

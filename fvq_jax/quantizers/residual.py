"""Residual quantization: a sequence of levels, each quantizing what the previous ones left.

Level k searches the current residual (optionally resampled to its own token grid) against
the one shared codebook, maps its codes back onto the full grid, adds them to the running
sum f_hat and subtracts them from the residual. The loss at level k compares the partial sum
f_hat_k with z, and the quantizer's losses are the averages over levels; the straight-through
estimator acts once, on the final sum.

`quantize_levels` / `sum_levels` hold this loop for every variant; `ResidualQuantizer` is the
plain case (every level on the full grid, codes added as they are: RVQ with one codebook
shared across `depth` levels). The multi-scale quantizer reuses them with resampling levels.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fvq_jax.quantizers import ops
from fvq_jax.quantizers.vq import SearchOptions, VectorQuantizer


def _identity(x: jax.Array) -> jax.Array:
    return x


@dataclasses.dataclass(frozen=True)
class Level:
    """One level of residual quantization.

    to_tokens: residual [B, h, w, D] -> the tokens searched at this level [B, s, s', D].
    to_grid: their codes [B, s, s', D] -> the contribution added to f_hat [B, h, w, D].
    """

    to_tokens: Callable[[jax.Array], jax.Array] = _identity
    to_grid: Callable[[jax.Array], jax.Array] = _identity


def quantize_levels(
    z: jax.Array,
    codebook: jax.Array,
    levels: Sequence[Level],
    *,
    beta: float = 0.25,
    entropy_weight: float = 0.0,
    entropy_temperature: float = 0.01,
    search: SearchOptions = SearchOptions(),
) -> dict:
    """Residual quantization of z over `levels`, all against one codebook, in float32.

    Args:
      z: [B, h, w, D] encoder features.
      codebook: [K, D] searched codes (already projected; float32 or bfloat16, as `ops.quantize`).
    Returns a dict:
      z_q: [B, h, w, D] the final sum f_hat, straight-through (gradient to z as identity);
      indices: a list with one int32 array per level, shaped like that level's tokens [B, s, s'];
      codebook_loss, commitment_loss (times beta), entropy_loss (times its weight): averages over
      levels of the level-k loss on the partial sum f_hat_k (entropy: on the level's tokens);
      loss: their sum; perplexity: of all levels' indices together.
    """
    z = z.astype(jnp.float32)
    codebook = ops.search_dtype(codebook)
    dim = z.shape[-1]
    # The search ignores gradients; only the entropy term reads the residual differentiably, and
    # like plain VQ's it reaches z (codes are subtracted under stop_gradient).
    residual = z
    f_hat = jnp.zeros_like(z)
    indices, cb_loss, commit, ent = [], 0.0, 0.0, 0.0
    for level in levels:
        tokens = level.to_tokens(residual)
        flat = tokens.reshape(-1, dim)
        idx = ops.nearest_code(flat, codebook, precision=search.precision, tile_size=search.tile_size,
                               token_chunk=search.token_chunk, impl=search.impl)
        contribution = level.to_grid(jnp.take(codebook.astype(jnp.float32), idx, axis=0).reshape(tokens.shape))
        f_hat = f_hat + contribution
        residual = residual - jax.lax.stop_gradient(contribution)
        indices.append(idx.reshape(tokens.shape[:-1]))
        cb_loss += ops.codebook_loss(z, f_hat)
        commit += ops.commitment_loss(z, f_hat)
        if entropy_weight:
            ent += ops.entropy_loss(flat, codebook, entropy_temperature, search.precision)
    n = len(levels)
    cb_loss, commit, ent = cb_loss / n, beta * commit / n, entropy_weight * ent / n
    all_indices = jnp.concatenate([i.reshape(-1) for i in indices])
    return {
        "z_q": ops.straight_through(z, f_hat),
        "indices": indices,
        "codebook_loss": cb_loss,
        "commitment_loss": commit,
        "entropy_loss": jnp.asarray(ent, jnp.float32),
        "loss": cb_loss + commit + ent,
        "perplexity": ops.perplexity(all_indices, codebook.shape[0]),
    }


def sum_levels(codebook: jax.Array, indices: Sequence[jax.Array], levels: Sequence[Level]) -> jax.Array:
    """f_hat from per-level indices, summed in the order `quantize_levels` sums them (same values).

    indices: one int32 array per level ([B, s, s']); returns [B, h, w, D] float32. Fewer indices
    than levels give the partial sum over the first levels.
    """
    codebook = codebook.astype(jnp.float32)
    f_hat = None
    for idx, level in zip(indices, levels):
        contribution = level.to_grid(jnp.take(codebook, idx, axis=0))
        f_hat = contribution if f_hat is None else f_hat + contribution
    return f_hat


class ResidualQuantizer(VectorQuantizer):
    """Residual VQ with one (bridged) codebook shared across `depth` levels.

    Indices are [B, h, w, depth] (level-major in the last axis); usage counts every level's.
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        *,
        depth: int = 4,
        projector: str = "L/4",
        beta: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
        search: SearchOptions = SearchOptions(),
        usage_window: int | None = None,
        bridge_chunks: int = 1,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"residual depth must be a positive int, got {depth!r}")
        super().__init__(codebook_size, code_dim, projector=projector, beta=beta, entropy_weight=entropy_weight,
                         entropy_temperature=entropy_temperature, search=search, usage_window=usage_window,
                         bridge_chunks=bridge_chunks, dtype=dtype, rngs=rngs)
        self.depth = depth

    def __call__(self, z: jax.Array, *, train: bool = False) -> dict:
        """z: [B, h, w, D] -> dict as `quantize_levels`, indices stacked to [B, h, w, depth]."""
        out = quantize_levels(z, self.codebook(None), [Level()] * self.depth, beta=self.beta,
                              entropy_weight=self.entropy_weight, entropy_temperature=self.entropy_temperature,
                              search=self.search)
        out["indices"] = jnp.stack(out["indices"], axis=-1)
        if train:
            out["usage"] = self.track_usage(out["indices"])
        return out

    def lookup(self, indices: jax.Array) -> jax.Array:
        """indices [..., d] -> the sum of their d codes [..., D] (d < depth: the partial sum)."""
        per_level = [indices[..., k] for k in range(indices.shape[-1])]
        return sum_levels(self.codebook(), per_level, [Level()] * len(per_level))

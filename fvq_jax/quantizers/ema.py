"""VQ with an exponential-moving-average codebook (VQ-VAE-2 style), an ablation baseline.

The codebook is not trained by gradients: after each training forward, every code moves to
the EMA of the encoder vectors assigned to it,
    N_k <- g N_k + (1 - g) n_k,    S_k <- g S_k + (1 - g) sum_{i: idx_i = k} z_i,
    e_k  = S_k / N~_k,             N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j,
with decay g and Laplace smoothing eps. The statistics and the codebook live in `EMAState`
variables (not nnx.Param), so an optimizer over the parameters never sees them; the train
step keeps the module's non-parameter state, as it does for the usage window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fvq_jax.quantizers import ops
from fvq_jax.quantizers.vq import SearchOptions, VectorQuantizer


class EMAState(nnx.Variable):
    """The EMA codebook and its statistics: model state, never a parameter."""


def ema_update(
    cluster_size: jax.Array,
    code_sum: jax.Array,
    z: jax.Array,
    indices: jax.Array,
    *,
    decay: float,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One EMA step of the codebook statistics (module docstring).

    Args:
      cluster_size: [K] EMA of the number of vectors assigned to each code.
      code_sum: [K, D] EMA of the sum of the vectors assigned to each code.
      z: [N, D] this step's (searched) encoder vectors; indices: [N] their codes.
    Returns: (cluster_size [K], code_sum [K, D], codebook [K, D]), float32.
    """
    num_codes = cluster_size.shape[0]
    z = jax.lax.stop_gradient(z.astype(jnp.float32))
    counts = ops.code_counts(indices, num_codes).astype(jnp.float32)
    sums = jax.ops.segment_sum(z, indices.reshape(-1), num_segments=num_codes)
    cluster_size = decay * cluster_size + (1.0 - decay) * counts
    code_sum = decay * code_sum + (1.0 - decay) * sums
    total = jnp.sum(cluster_size)
    smoothed = (cluster_size + epsilon) / (total + num_codes * epsilon) * total
    return cluster_size, code_sum, code_sum / smoothed[:, None]


class EMAQuantizer(VectorQuantizer):
    """Plain VQ (projector "none") whose codebook follows EMAs of its assigned vectors.

    The statistics start consistent with the initial codebook E0 (N_k = 1, S_k = E0_k), so
    e_k = E0_k until code k's statistics move. `codebook_loss` is 0 (no codebook gradient);
    `loss` is the commitment (+ entropy) loss. The codebook updates only when train=True.
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        *,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        beta: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
        l2_norm: bool = False,
        search: SearchOptions = SearchOptions(),
        usage_window: int | None = None,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        super().__init__(codebook_size, code_dim, projector="none", beta=beta, entropy_weight=entropy_weight,
                         entropy_temperature=entropy_temperature, l2_norm=l2_norm, search=search,
                         usage_window=usage_window, dtype=dtype, rngs=rngs)
        self.decay = decay
        self.epsilon = epsilon
        # The parent made the codebook a Param; here it is EMA state, invisible to the optimizer.
        initial = self.embedding[...]
        self.embedding = EMAState(initial)
        self.cluster_size = EMAState(jnp.ones((codebook_size,), jnp.float32))
        self.code_sum = EMAState(initial)

    def __call__(self, z: jax.Array, *, train: bool = False) -> dict:
        """z: [B, h, w, D] -> `ops.quantize` dict; with train=True also the usage and the EMA update."""
        out = self.quantize(z, self.codebook())
        out["loss"] = out["commitment_loss"] + out["entropy_loss"]
        out["codebook_loss"] = jnp.zeros((), jnp.float32)
        if train:
            out["usage"] = self.track_usage(out["indices"])
            tokens = z.reshape(-1, self.code_dim).astype(jnp.float32)
            # The statistics average the vectors the search saw (unit vectors with l2_norm).
            tokens = ops.l2_normalize(tokens) if self.l2_norm else tokens
            cluster_size, code_sum, codebook = ema_update(
                self.cluster_size[...], self.code_sum[...], tokens, out["indices"],
                decay=self.decay, epsilon=self.epsilon)
            self.cluster_size[...] = cluster_size
            self.code_sum[...] = code_sum
            self.embedding[...] = codebook
        return out

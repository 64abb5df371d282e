"""The vector quantizer module: raw codebook -> projector -> nearest-code search -> VQ losses.

The math lives in `ops`; this module owns the parameters (the raw codebook E and the
projector), the usage window, and the reshaping.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fvq_jax.quantizers import ops, restart, usage
from fvq_jax.quantizers.vqbridge import make_projector


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """How the nearest code is found (the result is the same up to `precision`); checked where the config is
    resolved (quantizers.factory.QuantizerSpec).

    precision: 'fp32' | 'tf32' | 'bf16' products for the distances.
    tile_size: codes per tile for the memory-bounded search; None searches all K at once.
    token_chunk: tokens per chunk inside the tiled search; None takes all tokens per tile.
    impl: 'xla' (naive or tiled) | 'pallas' (the fused kernel of `pallas_search`; it picks its
      own blocks, so tile_size and token_chunk apply to 'xla' only).
    """

    precision: ops.Precision = "fp32"
    tile_size: int | None = None
    token_chunk: int | None = None
    impl: ops.SearchImpl = "xla"



def uniform_codebook_init(num_codes: int):
    """Raw codebook init: uniform in (-1/K, 1/K)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -1.0 / num_codes, 1.0 / num_codes)
    return init


class VectorQuantizer(nnx.Module):
    """FVQ quantizer: codes = projector(E); z_q = nearest code; STE; VQ losses; usage window.

    With projector="none" this is plain VQ; with a VQBridge preset ("L/4", ...) it is FVQ.
    dtype is the projector's compute dtype (bfloat16: bf16 activations, float32 parameters); the
    search and the losses run in float32 either way. bridge_chunks: see `vqbridge.VQBridge`.
    restart: 'off' (the method) | 'pull' | 'claim': in training, codes without an assignment in the
    usage window are pulled toward the batch's tokens (`restart.pull_loss` / `restart.claim_loss`,
    times restart_weight, added to the quantizer loss).
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        *,
        projector: str = "L/4",
        beta: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
        l2_norm: bool = False,
        search: SearchOptions = SearchOptions(),
        usage_window: int | None = None,
        bridge_head_init_std: float = 0.0,
        bridge_chunks: int = 1,
        restart: str = "off",
        restart_weight: float = 1.0,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_codes = codebook_size
        self.code_dim = code_dim
        self.beta = beta
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.l2_norm = l2_norm
        self.search = search
        self.projector_name = projector
        self.projector = make_projector(projector, codebook_size, code_dim, bridge_head_init_std=bridge_head_init_std,
                                        bridge_chunks=bridge_chunks, dtype=dtype, rngs=rngs)
        self.embedding = nnx.Param(uniform_codebook_init(codebook_size)(rngs.params(), (codebook_size, code_dim)))
        buffer, position = usage.init_window(usage_window or usage.default_window(codebook_size))
        self.usage_buffer = usage.CodeUsage(buffer)
        self.usage_position = usage.CodeUsage(position)
        self.restart = restart
        self.restart_weight = restart_weight

    def codebook(self, dtype=jnp.float32) -> jax.Array:
        """The searched codebook [K, D] (projector output, unit norm if l2_norm) as `dtype`.

        dtype=None keeps the projector's compute dtype (bfloat16 with a bf16 bridge): the same
        values at half the memory, which the search takes as they are (`ops.quantize`).
        """
        codes = self.projector(self.embedding[...])
        if self.l2_norm:
            codes = ops.l2_normalize(codes.astype(jnp.float32))
        return codes if dtype is None else codes.astype(dtype)

    def quantize(self, z: jax.Array, codebook: jax.Array) -> dict[str, jax.Array]:
        """`ops.quantize` with this module's settings: z [..., D] against codebook [K, D]."""
        return ops.quantize(
            z, codebook, beta=self.beta, entropy_weight=self.entropy_weight,
            entropy_temperature=self.entropy_temperature, l2_norm=self.l2_norm,
            precision=self.search.precision, tile_size=self.search.tile_size,
            token_chunk=self.search.token_chunk, impl=self.search.impl)

    def track_usage(self, indices: jax.Array) -> jax.Array:
        """Push indices into the FIFO window; returns the windowed usage fraction."""
        buffer, position = usage.push(self.usage_buffer[...], self.usage_position[...], indices)
        self.usage_buffer[...] = buffer
        self.usage_position[...] = position
        return usage.window_usage(buffer, self.num_codes)

    def __call__(self, z: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        """z: [B, h, w, D] -> `ops.quantize` dict (z_q, indices [B, h, w], losses, perplexity).

        With train=True the indices also enter the usage window and the dict gains `usage` (and, with
        a restart, `pull_loss`, already in `loss`, and `pulled_codes`: the dead codes it acted on).
        """
        codebook = self.codebook(None)
        out = self.quantize(z, codebook)
        if train:
            if self.restart != "off":
                # The window before this batch's indices enter it: the codes dead so far.
                dead = restart.dead_codes(self.usage_buffer[...], self.num_codes)
                if self.restart == "claim":
                    loss = functools.partial(restart.claim_loss, tile_size=self.search.tile_size)
                else:
                    loss = restart.pull_loss
                pull = self.restart_weight * loss(z.reshape(-1, z.shape[-1]), codebook, dead, l2_norm=self.l2_norm,
                                                  precision=self.search.precision)
                out.update(loss=out["loss"] + pull, pull_loss=pull, pulled_codes=jnp.sum(dead))
            out["usage"] = self.track_usage(out["indices"])
        return out

    def lookup(self, indices: jax.Array) -> jax.Array:
        """indices [...] -> codes [..., D] float32 from the searched codebook."""
        return jnp.take(self.codebook(), indices, axis=0)


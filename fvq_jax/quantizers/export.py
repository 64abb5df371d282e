"""FVQ -> plain VQ export: bake the projector's output into the raw codebook.

At inference the projector (VQBridge, lin/1, ...) is a constant function of the raw codebook
E, so the searched codebook can be computed once and stored in E with projector "none". The
baked quantizer keeps its type (vq, residual, multiscale, ema), settings and other state (the
multi-scale phi convs, the usage window, EMA statistics) and gives the same indices and codes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flax import nnx

from fvq_jax.quantizers.vq import VectorQuantizer
from fvq_jax.quantizers.vqbridge import Identity

if TYPE_CHECKING:
    from fvq_jax.models.vqgan import VQGAN


def bake_codebook(quantizer: VectorQuantizer) -> VectorQuantizer:
    """An equivalent quantizer with projector "none" whose raw codebook is `quantizer.codebook()`.

    The input is left unchanged; unchanged arrays are shared, not copied. With l2_norm the
    stored codes are already unit vectors (normalising them again is a no-op up to rounding).
    """
    if not isinstance(quantizer, VectorQuantizer):
        raise TypeError(f"bake_codebook takes a VectorQuantizer (or subclass), got {type(quantizer).__name__}")
    codes = quantizer.codebook()
    baked = nnx.clone(quantizer)
    baked.projector = Identity()
    baked.projector_name = "none"
    # Written into the existing variable: a Param stays a Param, an EMA codebook stays EMA state.
    baked.embedding[...] = codes
    return baked


def bake(model: VQGAN) -> VQGAN:
    """The same tokenizer with its quantizer baked (`bake_codebook`); other weights are shared arrays."""
    baked = nnx.clone(model)
    baked.quantizer = bake_codebook(model.quantizer)
    return baked

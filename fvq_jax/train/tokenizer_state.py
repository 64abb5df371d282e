"""The tokenizer's train state: the core TrainState of the generator (VQGAN) plus the PatchGAN's."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import optax
from flax import nnx, struct

from fvq_jax.models.factory import build_discriminator, build_tokenizer
from fvq_jax.train.state import TrainState, model_fields

if TYPE_CHECKING:
    from fvq_jax.train.tokenizer import TokenizerRunSpec


@struct.dataclass
class TokenizerState(TrainState):
    """TrainState of the generator (params: encoder, decoder, raw codebook, projector) + the discriminator."""

    disc_params: nnx.State
    disc_state: nnx.State  # BatchNorm running statistics
    disc_opt_state: Any


@dataclasses.dataclass(frozen=True)
class Graphs:
    """Static module structure: merge with arrays to get modules back."""

    generator: nnx.GraphDef
    discriminator: nnx.GraphDef


def build(spec: TokenizerRunSpec, tx: optax.GradientTransformation,
          disc_tx: optax.GradientTransformation) -> tuple[Graphs, TokenizerState]:
    """Freshly initialised generator and discriminator (from spec.seed) as (Graphs, TokenizerState)."""
    generator = build_tokenizer(spec.tokenizer, dtype=spec.dtype, rngs=nnx.Rngs(spec.seed))
    discriminator = build_discriminator(spec.discriminator, dtype=spec.dtype, rngs=nnx.Rngs(spec.seed + 1))
    g_graph, fields = model_fields(generator, tx, keep_ema=bool(spec.optim.ema_decay))
    d_graph, d_params, d_rest = nnx.split(discriminator, nnx.Param, ...)
    state = TokenizerState(**fields, disc_params=d_params, disc_state=d_rest, disc_opt_state=disc_tx.init(d_params))
    return Graphs(g_graph, d_graph), state

"""The tokenizer's train state: the core TrainState of the generator (VQGAN) plus the PatchGAN's."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import optax
from flax import nnx, struct

from fvq_jax.models.factory import DiscriminatorSpec, VQGANSpec, build_discriminator, build_tokenizer, compute_dtype
from fvq_jax.train.state import TrainState, model_fields


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


def build(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
          disc_tx: optax.GradientTransformation) -> tuple[Graphs, TokenizerState]:
    """Freshly initialised generator and discriminator (from config.seed) as (Graphs, TokenizerState)."""
    dtype = compute_dtype(config.precision)
    generator = build_tokenizer(VQGANSpec.from_config(config), dtype=dtype, rngs=nnx.Rngs(config.seed))
    discriminator = build_discriminator(DiscriminatorSpec.from_config(config.discriminator, "discriminator"),
                                        dtype=dtype, rngs=nnx.Rngs(config.seed + 1))
    g_graph, fields = model_fields(generator, tx, keep_ema=bool(config.optim.ema_decay))
    d_graph, d_params, d_rest = nnx.split(discriminator, nnx.Param, ...)
    state = TokenizerState(**fields, disc_params=d_params, disc_state=d_rest, disc_opt_state=disc_tx.init(d_params))
    return Graphs(g_graph, d_graph), state

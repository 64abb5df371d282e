"""The tokenizer's train state: generator + discriminator, their optimizers, EMA; sharded init.

Modules are split once into a static graph (`Graphs`) and array state (`TokenizerState`, a
pytree), so train steps are pure functions of arrays that jit, shard, donate and checkpoint.
Init runs under `jax.eval_shape` first; the real init is jitted with the rule-derived
out_shardings, so a model larger than one device never materialises on one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct

from fvq_jax import sharding
from fvq_jax.models.factory import build_discriminator, build_tokenizer
from fvq_jax.train.schedules import learning_rate_schedule

COMPUTE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


@struct.dataclass
class TokenizerState:
    step: jax.Array
    params: nnx.State  # generator parameters (encoder, decoder, raw codebook, projector)
    model_state: nnx.State  # generator non-parameter state (usage window, EMA codebook stats)
    opt_state: Any
    ema_params: nnx.State | None  # EMA of `params`, or None when config.optim.ema_decay == 0
    disc_params: nnx.State
    disc_state: nnx.State  # BatchNorm running statistics
    disc_opt_state: Any


@dataclasses.dataclass(frozen=True)
class Graphs:
    """Static module structure: merge with arrays to get modules back."""

    generator: nnx.GraphDef
    discriminator: nnx.GraphDef


def make_optimizer(optim: ml_collections.ConfigDict, *, total_steps: int, global_batch: int):
    """Clip by global norm, then Adam(W) with the learning-annealing schedule."""
    lr = learning_rate_schedule(optim, total_steps=total_steps, global_batch=global_batch)
    if optim.weight_decay:
        # Decay only matrices and kernels, never biases, norms or the 1-D tables.
        adam = optax.adamw(lr, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay,
                           mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    else:
        adam = optax.adam(lr, b1=optim.b1, b2=optim.b2)
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adam) if optim.grad_clip else adam


def build_modules(config: ml_collections.ConfigDict):
    """The generator (VQGAN) and the PatchGAN, freshly initialised from config.seed."""
    dtype = COMPUTE_DTYPES[config.precision]
    generator = build_tokenizer(config, dtype=dtype, rngs=nnx.Rngs(config.seed))
    discriminator = build_discriminator(config.discriminator, dtype=dtype, rngs=nnx.Rngs(config.seed + 1))
    return generator, discriminator


def split_modules(generator, discriminator):
    """(Graphs, gen params, gen other state, disc params, disc other state)."""
    g_graph, g_params, g_rest = nnx.split(generator, nnx.Param, ...)
    d_graph, d_params, d_rest = nnx.split(discriminator, nnx.Param, ...)
    return Graphs(g_graph, d_graph), g_params, g_rest, d_params, d_rest


def init_fn(config: ml_collections.ConfigDict, tx, disc_tx) -> Callable[[], TokenizerState]:
    def init() -> TokenizerState:
        _, g_params, g_rest, d_params, d_rest = split_modules(*build_modules(config))
        return TokenizerState(
            step=jnp.zeros((), jnp.int32),
            params=g_params,
            model_state=g_rest,
            opt_state=tx.init(g_params),
            ema_params=g_params if config.optim.ema_decay else None,
            disc_params=d_params,
            disc_state=d_rest,
            disc_opt_state=disc_tx.init(d_params),
        )
    return init


def graphs_of(config: ml_collections.ConfigDict) -> Graphs:
    """The static graphs, without allocating any parameter."""
    return split_modules(*nnx.eval_shape(lambda: build_modules(config)))[0]


def create_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, tx, disc_tx):
    """(Graphs, abstract state with shardings, shardings, init function jitted onto the mesh)."""
    init = init_fn(config, tx, disc_tx)
    abstract = jax.eval_shape(init)
    shardings = sharding.config_shardings(abstract, mesh, config.mesh)
    return graphs_of(config), sharding.with_shardings(abstract, shardings), shardings, jax.jit(
        init, out_shardings=shardings)

"""The core train state every trainer uses (a trainer's own state extends it) and its sharded init.

A model is split once into a static graph and array state, so train steps are pure functions of
arrays that jit, shard, donate and checkpoint. `create_state` runs the init under `jax.eval_shape`
first; the real init is jitted with the rule-derived out_shardings (fvq_jax/sharding.py), so a
model larger than one device never materialises on one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Generic, TypeVar

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from fvq_jax import sharding
from fvq_jax.models.load import choose_weights

@struct.dataclass
class TrainState:
    """step, a model's parameters and other state, its optimizer state, and the EMA of its parameters."""

    step: jax.Array
    params: nnx.State  # the nnx.Params of the model
    model_state: nnx.State  # its other variables (usage window, EMA-codebook statistics, ...)
    opt_state: Any
    ema_params: nnx.State | None  # EMA of `params`, or None when the run keeps none

    def inference_params(self, use_ema: bool = True) -> tuple[nnx.State, str]:
        """The weights to evaluate, sample or export with, and which they are ("ema" | "raw"): the EMA
        when the run kept one and `use_ema`, else the raw parameters (the rule: models.load.choose_weights)."""
        weights = choose_weights(self.ema_params is not None, use_ema)
        return (self.ema_params if weights == "ema" else self.params), weights


def model_fields(model: nnx.Module, tx: optax.GradientTransformation, *, keep_ema: bool) -> tuple[nnx.GraphDef, dict]:
    """(graph, the TrainState fields of a freshly built `model`) at step 0."""
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    return graph, dict(step=jnp.zeros((), jnp.int32), params=params, model_state=rest, opt_state=tx.init(params),
                       ema_params=params if keep_ema else None)


S = TypeVar("S", bound=TrainState)


@dataclasses.dataclass(frozen=True)
class StateLayout(Generic[S]):
    """A train state's static graphs, its abstract arrays (carrying their shardings) and the jitted init."""

    graphs: Any  # whatever the builder returned beside the state (GraphDefs)
    abstract: S  # ShapeDtypeStructs with shardings: the target of a sharded restore
    shardings: S
    init: Callable[[], S]  # jitted onto the mesh


def create_state(build: Callable[[], tuple[Any, S]], mesh: jax.sharding.Mesh,
                 mesh_spec: sharding.MeshSpec) -> StateLayout[S]:
    """Lay out the state `build()` returns (beside its static graphs) on `mesh` by the mesh block's rules.

    `build` constructs the modules and returns (graphs, state); it is traced, never run eagerly.
    """
    graphs = []

    def init() -> S:
        graph, state = build()
        graphs.append(graph)
        return state

    abstract = jax.eval_shape(init)
    shardings = sharding.config_shardings(abstract, mesh, mesh_spec)
    return StateLayout(graphs=graphs[0], abstract=sharding.with_shardings(abstract, shardings), shardings=shardings,
                       init=jax.jit(init, out_shardings=shardings))


def num_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))

"""A tokenizer run's whole train state (generator, discriminator, optimizers, EMA), on the devices present now.

For inspecting or continuing a run by hand. Inference (evaluation, export, code extraction) loads
only the weights it needs with `fvq_jax.models.load.load_tokenizer`.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from fvq_jax import checkpointing, sharding
from fvq_jax.train.optimizer import make_optimizer
from fvq_jax.train.state import create_state
from fvq_jax.train.tokenizer_state import TokenizerState, build


@dataclasses.dataclass
class RestoredTokenizer:
    config: ml_collections.ConfigDict  # the training config saved with the checkpoint
    step: int
    state: TokenizerState
    mesh: jax.sharding.Mesh


def restore_tokenizer(workdir, *, step: int | None = None, mesh_cfg=None) -> RestoredTokenizer:
    """The train state saved in `workdir` (the newest readable step unless `step`), laid out on the mesh
    `mesh_cfg` describes (default: data parallel over all devices present).

    FileNotFoundError when `workdir` has no checkpoint, or none of `step` (naming the saved steps).
    """
    checkpointer = checkpointing.Saved(workdir).checkpointer
    if checkpointer is None:
        raise ValueError(f"{workdir} is an export: it holds weights, not a train state")

    def read(step: int) -> RestoredTokenizer:
        config = ml_collections.ConfigDict(checkpointer.restore_config(step))
        config.mesh = mesh_cfg or ml_collections.ConfigDict(sharding.default_mesh_config())
        mesh = sharding.make_mesh(config.mesh)
        tx = make_optimizer(config.optim, total_steps=config.train.num_steps, global_batch=config.train.global_batch)
        layout = create_state(lambda: build(config, tx, tx), mesh, config.mesh)
        return RestoredTokenizer(config=config, step=step, state=checkpointer.restore(step, layout.abstract), mesh=mesh)

    return checkpointing.newest_readable(checkpointer, read, step=step)[1]

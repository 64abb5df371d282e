"""A tokenizer run's whole train state (generator, discriminator, optimizers, EMA), on the devices present now.

For inspecting or continuing a run by hand. Inference (evaluation, export, code extraction) loads
only the weights it needs with `fvq_jax.models.load.load_tokenizer`.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from fvq_jax import checkpointing
from fvq_jax.sharding import MeshSpec, make_mesh
from fvq_jax.train.optimizer import make_optimizer
from fvq_jax.train.state import create_state
from fvq_jax.train.tokenizer import TokenizerRunSpec
from fvq_jax.train.tokenizer_state import TokenizerState, build


@dataclasses.dataclass
class RestoredTokenizer:
    config: ml_collections.ConfigDict  # the training config saved with the checkpoint
    step: int
    state: TokenizerState
    mesh: jax.sharding.Mesh


def restore_tokenizer(workdir, *, step: int | None = None, mesh_spec: MeshSpec | None = None) -> RestoredTokenizer:
    """The train state saved in `workdir` (the newest readable step unless `step`), laid out on the mesh
    `mesh_spec` describes (default: data parallel over all devices present).

    FileNotFoundError when `workdir` has no checkpoint, or none of `step` (naming the saved steps).
    """
    checkpointer = checkpointing.Saved(workdir).checkpointer
    if checkpointer is None:
        raise ValueError(f"{workdir} is an export: it holds weights, not a train state")

    def read(step: int) -> RestoredTokenizer:
        config = ml_collections.ConfigDict(checkpointer.restore_config(step))
        spec = TokenizerRunSpec.from_config(config, mesh=mesh_spec or MeshSpec.default())
        mesh = make_mesh(spec.mesh)
        tx = make_optimizer(spec.optim, total_steps=spec.train.num_steps, global_batch=spec.train.global_batch)
        layout = create_state(lambda: build(spec, tx, tx), mesh, spec.mesh)
        return RestoredTokenizer(config=config, step=step, state=checkpointer.restore(step, layout.abstract), mesh=mesh)

    return checkpointing.newest_readable(checkpointer, read, step=step)[1]

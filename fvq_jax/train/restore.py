"""Restore a trained tokenizer from a training workdir, on whatever devices are present now.

The checkpoint carries the config that trained it, so the model is rebuilt exactly; arrays are
restored against an abstract target with the *current* mesh's shardings (a run saved on 8
devices restores on 1 CPU, and vice versa).
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
from etils import epath
from flax import nnx

from fvq_jax import checkpointing, sharding
from fvq_jax.train import state as state_lib


# Data parallelism over whatever devices are present (a saved mesh may not fit them).
DEFAULT_MESH = sharding.default_mesh_config()


@dataclasses.dataclass
class RestoredTokenizer:
    config: ml_collections.ConfigDict  # the training config saved with the checkpoint
    step: int
    state: state_lib.TokenizerState
    graphs: state_lib.Graphs
    mesh: jax.sharding.Mesh

    def generator_params(self, use_ema: bool = True) -> nnx.State:
        """The EMA weights when the run kept them (and `use_ema`), else the raw ones."""
        return self.state.ema_params if use_ema and self.state.ema_params is not None else self.state.params

    def generator(self, use_ema: bool = True):
        """The VQGAN module with the restored weights (and usage / EMA-codebook state)."""
        return nnx.merge(self.graphs.generator, self.generator_params(use_ema), self.state.model_state)


def checkpoint_dir(workdir) -> epath.Path:
    return epath.Path(workdir) / "checkpoints"


def _checkpointer(workdir) -> checkpointing.Checkpointer:
    directory = checkpoint_dir(workdir)
    if not directory.exists():
        raise FileNotFoundError(f"no checkpoint under {directory}: train first, or check --workdir")
    return checkpointing.Checkpointer(directory, read_only=True, async_save=False)


def saved_config(workdir, step: int | None = None) -> ml_collections.ConfigDict:
    """The training config recorded in the checkpoint (the `run` facts stay under `.run`)."""
    return ml_collections.ConfigDict(_checkpointer(workdir).restore_config(step))


def restore_tokenizer(workdir, *, step: int | None = None, mesh_cfg=None) -> RestoredTokenizer:
    """The tokenizer train state saved in `workdir` (latest step unless `step`), laid out on the
    mesh `mesh_cfg` describes (default: data parallel over all devices present).

    FileNotFoundError when `workdir` has no checkpoint, or none of `step` (naming the saved steps).
    """
    checkpointer = _checkpointer(workdir)
    step = checkpointer.saved_step(step)
    config = ml_collections.ConfigDict(checkpointer.restore_config(step))
    config.mesh = mesh_cfg or ml_collections.ConfigDict(DEFAULT_MESH)
    mesh = sharding.make_mesh(config.mesh)
    total, batch = config.train.num_steps, config.train.global_batch
    tx = state_lib.make_optimizer(config.optim, total_steps=total, global_batch=batch)
    graphs, abstract, _, _ = state_lib.create_state(config, mesh, tx, tx)
    state = checkpointer.restore(step, abstract)
    return RestoredTokenizer(config=config, step=step, state=state, graphs=graphs, mesh=mesh)

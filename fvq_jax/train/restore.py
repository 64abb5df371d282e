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


def saved_config(workdir, step: int | None = None) -> ml_collections.ConfigDict:
    """The training config recorded in the checkpoint (the `run` facts stay under `.run`)."""
    checkpointer = checkpointing.Checkpointer(checkpoint_dir(workdir), read_only=True, async_save=False)
    if checkpointer.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint under {checkpoint_dir(workdir)}: train first, or check --workdir")
    return ml_collections.ConfigDict(checkpointer.restore_config(step))


def restore_tokenizer(workdir, *, step: int | None = None, mesh_cfg=None) -> RestoredTokenizer:
    """The tokenizer train state saved in `workdir` (latest step unless `step`), laid out on the
    mesh `mesh_cfg` describes (default: data parallel over all devices present)."""
    config = saved_config(workdir, step)
    # The saved mesh may not fit the devices present now: default to data parallelism over them.
    config.mesh = mesh_cfg or ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2 ** 18))
    mesh = sharding.make_mesh(config.mesh)
    total, batch = config.train.num_steps, config.train.global_batch
    tx = state_lib.make_optimizer(config.optim, total_steps=total, global_batch=batch)
    graphs, abstract, _, _ = state_lib.create_state(config, mesh, tx, tx)
    checkpointer = checkpointing.Checkpointer(checkpoint_dir(workdir), read_only=True, async_save=False)
    step = checkpointer.latest_step() if step is None else step
    state = checkpointer.restore(step, abstract)
    return RestoredTokenizer(config=config, step=step, state=state, graphs=graphs, mesh=mesh)

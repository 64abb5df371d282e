"""Config checks every trainer shares (train, optim, mesh blocks), run before anything is built."""

from __future__ import annotations

import ml_collections

from fvq_jax import config_lib, sharding
from fvq_jax.data import pipeline as data_pipeline
from fvq_jax.train import resume, schedules


def check_train_config(config: ml_collections.ConfigDict, num_devices: int | None, num_processes: int | None, *,
                       steps_from_epochs: bool = False) -> None:
    """ConfigError naming the field for a bad `train`, `optim` or `mesh` value, or a global batch that does
    not split over `num_devices` (data x fsdp) and `num_processes` (None: not known yet, not checked).

    steps_from_epochs: train.num_steps may be 0, meaning train.num_epochs over the data but at least
    train.min_steps (the trainer resolves it once it knows the data); the step-count checks of the optim
    block wait until it is resolved.
    """
    train = config.train
    for name in ("global_batch", "log_every", "checkpoint_every", "keep_checkpoints"):
        config_lib.require_number(train[name], f"train.{name}", integer=True)
    config_lib.require_number(train.num_steps, "train.num_steps", strict=not steps_from_epochs, integer=True)
    if steps_from_epochs and not train.num_steps:
        config_lib.require_number(train.num_epochs, "train.num_epochs")
        config_lib.require_number(train.min_steps, "train.min_steps", strict=False, integer=True)
    for name in ("keep_every", "restore_step"):
        config_lib.require_number(train.get(name, 0), f"train.{name}", strict=False, integer=True)
    resume.allowed_changes(config)
    if train.num_steps:
        schedules.check_optim_config(config.optim, train.num_steps)
    sharding.rules_of(config.mesh)
    if num_devices is not None:
        check_batch_split(config, train.global_batch, "train.global_batch", num_devices)
    if num_processes is not None:
        data_pipeline.local_batch_size(train.global_batch, num_processes, "train.global_batch")


def check_batch_split(config: ml_collections.ConfigDict, batch: int, field: str, num_devices: int) -> None:
    """ConfigError(field) unless `batch` splits over the data-parallel devices (mesh data x fsdp)."""
    shards = sharding.batch_shards(config.mesh, num_devices)
    config_lib.require(batch % shards == 0, field, f"{batch} does not split over the {shards} data-parallel devices "
                       f"(mesh data x fsdp of {num_devices} devices)")

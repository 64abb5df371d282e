"""What every trainer's config resolves into before anything is built: `RunSpec` and its `train` block.

A trainer (train/tokenizer.py, train/gpt.py) subclasses RunSpec with its own blocks (model, loss, data, ...)
and its own TrainSpec fields, and resolves its config once, in its `resolve(config, num_devices,
num_processes)`, which `tasks.resolve` calls. Each field is checked in its spec's `__post_init__`; what crosses
blocks (warmup against the step count, the image size against the encoder) in the run spec's; what needs the
device and process counts in `check_devices`. Nothing below checks a field again.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from fvq_jax import config_lib
from fvq_jax.data.pipeline import local_batch_size
from fvq_jax.models.factory import COMPUTE_DTYPES, compute_dtype
from fvq_jax.sharding import MeshSpec
from fvq_jax.train.optimizer import OptimSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSpec(config_lib.Spec):
    """The `train` block's fields every trainer has (configs/tokenizer.py and configs/gpt.py describe them).

    `STEPS_FROM_EPOCHS`: a trainer whose num_steps may be 0 as given (the GPT: from epochs over its codes,
    resolved before its run spec is; see train/gpt.py)."""

    STEPS_FROM_EPOCHS = False

    global_batch: int
    num_steps: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    keep_every: int = config_lib.later(0)  # 0: no step kept for good
    restore_step: int = config_lib.later(0)  # 0: the newest
    allow_changes: str = config_lib.later("")  # comma-separated fields (or blocks) a resume may change

    def __post_init__(self):
        for name in ("global_batch", "log_every", "checkpoint_every", "keep_checkpoints"):
            config_lib.require_number(getattr(self, name), name, integer=True)
        config_lib.require_number(self.num_steps, "num_steps", strict=not self.STEPS_FROM_EPOCHS, integer=True)
        for name in ("keep_every", "restore_step"):
            config_lib.require_number(getattr(self, name), name, strict=False, integer=True)
        config_lib.require(isinstance(self.allow_changes, str), "allow_changes",
                           f"must be a comma-separated string of field names, got {self.allow_changes!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSpec(config_lib.Spec):
    """A training run's config resolved (`RunSpec.from_config(config)`: errors name `block.field`): the blocks the
    training program reads (train/program.py), which every trainer's spec has, plus the trainer's own.

    `config` is the config these were resolved from, kept for one use: it is saved as JSON with every checkpoint
    (resume.config_json) and compared with the saved one on resume (resume.check_resume_config). Nothing reads a
    field from it.
    """

    seed: int
    precision: str  # the modules' compute dtype (parameters stay float32)
    train: TrainSpec
    optim: OptimSpec
    mesh: MeshSpec
    config: ml_collections.ConfigDict

    def __post_init__(self):
        config_lib.require_number(self.seed, "seed", strict=False, integer=True)
        compute_dtype(self.precision)
        config_lib.require(self.optim.warmup_steps < self.train.num_steps, "optim.warmup_steps",
                           f"{self.optim.warmup_steps} must be below train.num_steps={self.train.num_steps}")

    @classmethod
    def from_config(cls, config, prefix: str = "", **overrides):
        """The spec of a whole training config (`config` kept beside the blocks)."""
        return super().from_config(config, prefix, config=config, **overrides)

    @property
    def dtype(self):
        return COMPUTE_DTYPES[self.precision]

    def check_devices(self, num_devices: int | None, num_processes: int | None) -> None:
        """ConfigError naming the field for a batch that does not split over `num_devices` (the mesh's data x fsdp)
        or `num_processes` (None: not known yet, not checked)."""
        if num_devices is not None:
            self.mesh.check_batch(self.train.global_batch, "train.global_batch", num_devices)
        if num_processes is not None:
            local_batch_size(self.train.global_batch, num_processes, "train.global_batch")

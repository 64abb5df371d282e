"""The one optimizer factory every trainer uses, and the EMA of the weights.

clip by global norm -> Adam, or AdamW when `optim.weight_decay` > 0 (decaying only arrays with
at least two dimensions: kernels, embeddings; never biases, norm scales or other 1-D tables),
with the learning rate of `schedules.learning_rate_schedule`.
"""

from __future__ import annotations

import dataclasses

import jax
import optax
from flax import nnx

from fvq_jax import config_lib, sharding
from fvq_jax.train.schedules import SCHEDULES, learning_rate_schedule


@dataclasses.dataclass(frozen=True)
class OptimSpec(config_lib.Spec):
    """The `optim` block resolved (configs/tokenizer.py and configs/gpt.py describe each field); that warmup_steps
    stays below the step count is the run spec's check (train/spec.py)."""

    base_lr: float  # at global batch lr_ref_batch; scaled linearly with the global batch
    lr_ref_batch: int
    b1: float
    b2: float
    weight_decay: float  # > 0: AdamW
    grad_clip: float  # 0: no clipping
    schedule: str  # SCHEDULES
    warmup_steps: int
    warmup_start: float
    decay_start: float
    final_mult: float
    ema_decay: float  # 0: no EMA of the weights

    def __post_init__(self):
        config_lib.require_choice(self.schedule, "schedule", SCHEDULES)
        for name in ("base_lr", "lr_ref_batch", "warmup_start", "final_mult"):
            config_lib.require_number(getattr(self, name), name)
        config_lib.require_number(self.warmup_steps, "warmup_steps", strict=False, integer=True)
        config_lib.require(0.0 <= self.decay_start < 1.0, "decay_start", f"must lie in [0, 1), got {self.decay_start}")
        for name in ("b1", "b2"):
            value = getattr(self, name)
            config_lib.require(0.0 <= value < 1.0, name, f"must lie in [0, 1), got {value}")
        config_lib.require_number(self.weight_decay, "weight_decay", strict=False)
        config_lib.require_number(self.grad_clip, "grad_clip", strict=False)
        config_lib.require(0.0 <= self.ema_decay < 1.0, "ema_decay", f"must lie in [0, 1), got {self.ema_decay}")


def decay_mask(params):
    """True for the arrays weight decay applies to: >= 2-D, not counting the [n_layer] that leads the stacked
    parameters of scanned layers (a stack of norm scales is not decayed either)."""
    def mask(x):
        ndim = x.ndim - ((sharding.logical_axes_of(x) or ())[:1] == ("layers",))
        return jax.tree.map(lambda p: ndim >= 2, x)

    return jax.tree.map(mask, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(optim: OptimSpec, *, total_steps: int, global_batch: int) -> optax.GradientTransformation:
    lr = learning_rate_schedule(optim, total_steps=total_steps, global_batch=global_batch)
    if optim.weight_decay:
        adam = optax.adamw(lr, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=decay_mask)
    else:
        adam = optax.adam(lr, b1=optim.b1, b2=optim.b2)
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adam) if optim.grad_clip else adam


def ema_update(ema_params, params, decay: float):
    """decay * ema + (1 - decay) * params (optax's Polyak update)."""
    return optax.incremental_update(params, ema_params, step_size=1.0 - decay)

"""Learning annealing: FVQ's per-step multiplier on the base learning rate.

warmup: linear from `warmup_start` to 1 over `warmup_steps`; then, with progress
s = (step - warmup) / (total - 1 - warmup) in [0, 1]:
  'lin'   : 1 while s < T, then final + (1 - final) * (1 - s) / (1 - T), reaching `final` at the end;
  'cos'   : 1 while s < T, then a half cosine from 1 to `final`;
  'const' : 1.
The generator and the discriminator share it; the base LR scales with the global batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp

if TYPE_CHECKING:
    from fvq_jax.train.optimizer import OptimSpec

SCHEDULES = ("lin", "cos", "const")


def annealing_multiplier(step, *, total_steps: int, warmup_steps: int, kind: str = "lin",
                         warmup_start: float = 0.005, decay_start: float = 0.3, final_mult: float = 0.01):
    """The LR multiplier at `step` (a Python int or a traced int array); float32."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    step = jnp.asarray(step, jnp.float32)
    warm = warmup_start + (1.0 - warmup_start) * step / max(warmup_steps, 1)
    s = jnp.clip((step - warmup_steps) / max(total_steps - 1 - warmup_steps, 1), 0.0, 1.0)
    decay = jnp.clip((s - decay_start) / max(1.0 - decay_start, 1e-12), 0.0, 1.0)  # 0 at T, 1 at the end
    if kind == "lin":
        after = 1.0 - (1.0 - final_mult) * decay
    elif kind == "cos":
        after = final_mult + (1.0 - final_mult) * 0.5 * (1.0 + jnp.cos(jnp.pi * decay))
    else:
        after = jnp.ones_like(s)
    return jnp.where(step < warmup_steps, warm, after)


def scaled_base_lr(optim: OptimSpec, global_batch: int) -> float:
    """base_lr x global_batch / lr_ref_batch (FVQ: 1e-4 at batch 128)."""
    return optim.base_lr * global_batch / optim.lr_ref_batch


def learning_rate_schedule(optim: OptimSpec, *, total_steps: int, global_batch: int):
    """step -> learning rate, from the `optim` block."""
    base = scaled_base_lr(optim, global_batch)

    def schedule(step):
        return base * annealing_multiplier(
            step, total_steps=total_steps, warmup_steps=optim.warmup_steps, kind=optim.schedule,
            warmup_start=optim.warmup_start, decay_start=optim.decay_start, final_mult=optim.final_mult)

    return schedule

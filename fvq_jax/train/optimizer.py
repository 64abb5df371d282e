"""The one optimizer factory every trainer uses, and the EMA of the weights.

clip by global norm -> Adam, or AdamW when `optim.weight_decay` > 0 (decaying only arrays with
at least two dimensions: kernels, embeddings; never biases, norm scales or other 1-D tables),
with the learning rate of `schedules.learning_rate_schedule`.
"""

from __future__ import annotations

import jax
import ml_collections
import optax
from flax import nnx

from fvq_jax import sharding
from fvq_jax.train.schedules import learning_rate_schedule


def decay_mask(params):
    """True for the arrays weight decay applies to: >= 2-D, not counting the [n_layer] that leads the stacked
    parameters of scanned layers (a stack of norm scales is not decayed either)."""
    def mask(x):
        ndim = x.ndim - ((sharding.logical_axes_of(x) or ())[:1] == ("layers",))
        return jax.tree.map(lambda p: ndim >= 2, x)

    return jax.tree.map(mask, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(optim: ml_collections.ConfigDict, *, total_steps: int,
                   global_batch: int) -> optax.GradientTransformation:
    lr = learning_rate_schedule(optim, total_steps=total_steps, global_batch=global_batch)
    if optim.weight_decay:
        adam = optax.adamw(lr, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=decay_mask)
    else:
        adam = optax.adam(lr, b1=optim.b1, b2=optim.b2)
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adam) if optim.grad_clip else adam


def ema_update(ema_params, params, decay: float):
    """decay * ema + (1 - decay) * params (optax's Polyak update)."""
    return optax.incremental_update(params, ema_params, step_size=1.0 - decay)

"""Applying gradients, and the guard that keeps a bad step out of the state, for every trainer.

The guard checks more than the loss: a step with a finite loss can still write parameters near
1e29 (a huge learning rate), which a checkpoint would keep as "last good" while every later step
overflows. So every update reports the global norms of its gradients, of the update itself and of
the new parameters; their squares overflow float32 long before the values do (|x| > ~1e19), so a
finite norm also bounds the arrays. A step whose checked values are not all finite changes nothing,
not even the step counter, and the loop stops naming the step and the values.
"""

from __future__ import annotations

from typing import Mapping, TypeVar

import jax
import jax.numpy as jnp
import optax

from fvq_jax.losses import global_norm

T = TypeVar("T")


def apply_gradients(tx: optax.GradientTransformation, grads, opt_state, params, *, prefix: str = ""):
    """One optimizer update: (new params, new opt_state, {grad_norm, update_norm, param_norm}), the norm
    names prefixed by `prefix` (e.g. "disc_")."""
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    norms = {"grad_norm": global_norm(grads), "update_norm": global_norm(updates), "param_norm": global_norm(params)}
    return params, opt_state, {prefix + k: v for k, v in norms.items()}


def keep_if_finite(new_state: T, old_state: T, checked: Mapping[str, jax.Array]) -> tuple[T, jax.Array]:
    """(new_state if every value in `checked` is finite else old_state, that verdict as float32 1/0)."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in checked.values()]))
    state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, old_state)
    return state, finite.astype(jnp.float32)

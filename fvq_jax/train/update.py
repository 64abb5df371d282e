"""Applying gradients, and the guards that keep a bad step from becoming a "last good" checkpoint.

Two checks, for every trainer:
  * inside the step (`keep_if_finite`): the losses and gradient norms; a step where one is not finite
    changes nothing, not even the step counter;
  * after the step (`parameter_norms`, run by the loop as its own small jitted program before the state
    can be logged as good or saved): the global norm of every trained parameter tree. A step with finite
    losses can still write parameters near 1e29 (a huge learning rate); their squared norm overflows
    float32 long before the values do (|x| > ~1e19), and an update that is itself inf or NaN leaves
    them inf or NaN, so a finite norm bounds both the parameters and the update.
The second check is a separate program on purpose: reductions added to the step would change how XLA
fuses the optimizer update and, with it, the last bits of every later loss.
"""

from __future__ import annotations

from typing import Mapping, TypeVar

import jax
import jax.numpy as jnp
import optax

from fvq_jax.losses import global_norm

T = TypeVar("T")


def apply_gradients(tx: optax.GradientTransformation, grads, opt_state, params, *, prefix: str = ""):
    """One optimizer update: (new params, new opt_state, {prefix + "grad_norm": ...})."""
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {prefix + "grad_norm": global_norm(grads)}


def keep_if_finite(new_state: T, old_state: T, checked: Mapping[str, jax.Array]) -> tuple[T, jax.Array]:
    """(new_state if every value in `checked` is finite else old_state, that verdict as float32 1/0)."""
    finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in checked.values()]))
    state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, old_state)
    return state, finite.astype(jnp.float32)


def parameter_norms(state) -> dict[str, jax.Array]:
    """{"param_norm": ...} of a TrainState, plus "disc_param_norm" when it has a discriminator."""
    norms = {"param_norm": global_norm(state.params)}
    if hasattr(state, "disc_params"):
        norms["disc_param_norm"] = global_norm(state.disc_params)
    return norms

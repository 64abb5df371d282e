"""One GPT update: next-token cross-entropy over the code sequence, AdamW, EMA, the guard.

Inputs are [class, t_0 ... t_{N-2}], targets t_0 ... t_{N-1}; the loss applies the output layer in
chunks of `loss.chunk_size` tokens (fvq_jax/losses_gpt.py), so the [tokens, K] logits never exist
whole. Dropout (class, token, residual, FFN) draws from fold_in(key(seed), step): the same step gives
the same masks on any mesh and after a resume.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import optax
from flax import nnx

from fvq_jax import config_lib, sharding
from fvq_jax.losses_gpt import chunked_cross_entropy
from fvq_jax.train.optimizer import ema_update
from fvq_jax.train.state import TrainState
from fvq_jax.train.update import apply_gradients, keep_if_finite

CHECKED = ("loss", "grad_norm")  # the loop checks the new parameters' norms


@dataclasses.dataclass(frozen=True)
class LossSpec(config_lib.Spec):
    """The GPT's `loss` block resolved."""

    chunk_size: int  # tokens whose [tokens, K] logits exist at once; 0 = the whole batch

    def __post_init__(self):
        config_lib.require_number(self.chunk_size, "chunk_size", strict=False, integer=True)


def make_train_step(graph: nnx.GraphDef, loss_spec: LossSpec, tx: optax.GradientTransformation, lr_schedule: Callable,
                    *, rules: sharding.Rules, ema_decay: float, seed: int) -> Callable:
    """train_step(state, batch) -> (state, metrics); batch: {"codes": int32 [B, N], "label": int32 [B]}.
    rules: the mesh block's logical-axis rules; ema_decay: optim.ema_decay (used when the state keeps an EMA);
    seed: the run's (dropout masks)."""

    def train_step(state: TrainState, batch: dict):
        codes, labels = batch["codes"], batch["label"]
        dropout_key = jax.random.fold_in(jax.random.key(seed), state.step)
        chunk = loss_spec.chunk_size or codes.size

        def loss_fn(params):
            model = nnx.merge(graph, params, state.model_state)
            hidden = model.hidden_states(codes[:, :-1], labels, train=True, dropout_key=dropout_key)
            return chunked_cross_entropy(hidden, model.output.kernel[...], codes, chunk_size=chunk)

        with sharding.axis_rules(rules):  # traced here: the model's activation constraints resolve on the mesh
            (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        params, opt_state, norms = apply_gradients(tx, grads, state.opt_state, state.params)
        ema_params = state.ema_params if state.ema_params is None else ema_update(state.ema_params, params, ema_decay)
        metrics = dict(norms, loss=loss, accuracy=accuracy, lr=lr_schedule(state.step))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
        new_state, metrics["finite"] = keep_if_finite(new_state, state, {k: metrics[k] for k in CHECKED})
        return new_state, metrics

    return train_step

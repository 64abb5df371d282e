"""VQBridge's in-patch positions: their usage in the training window, and reviving dead ones.

VQBridge's last Linear (the head, kernel [H, p*p*D], bias [p*p*D], outputs laid out as
(row-in-patch, col-in-patch, D)) maps each patch token to the p^2 codes of its p x p block, so
every code at in-patch position j = (row % p) * p + col % p comes from the same row-group of the
head: kernel[:, j*D:(j+1)*D] and bias[j*D:(j+1)*D]. That row-group only gets gradient from its own
selected codes, and the head starts at zero, so a position that is never selected never moves:
its codes stay tied at one value and usage stops at (live positions) / p^2.

`revive_dead_positions` re-seeds the row-groups of positions with no assignment among the latest
assignments of the usage window from the most used position plus small noise, and zeroes their
optimizer moments.
It runs outside the train step, as a periodic update of the state (train.tokenizer), so the step
program is the same whether it is on or off; it depends only on the checkpointed state and the
step, so a resumed run repeats it exactly.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.tree_util import DictKey

# Where the head sits in the tokenizer's parameters (and in every optimizer tree that mirrors them).
HEAD_PATH = ("quantizer", "projector", "head")


def position_of(indices: jax.Array, num_codes: int, patch: int) -> jax.Array:
    """Code indices -> in-patch position (row % p) * p + col % p on the sqrt(K) x sqrt(K) grid."""
    side = math.isqrt(num_codes)
    return (indices // side % patch) * patch + indices % side % patch


def position_counts(window: jax.Array, num_codes: int, patch: int) -> jax.Array:
    """window: [W] code indices (-1 = empty slot) -> [p*p] int32 assignments per in-patch position."""
    valid = window >= 0
    positions = position_of(jnp.where(valid, window, 0), num_codes, patch)
    return jnp.zeros((patch * patch,), jnp.int32).at[positions].add(valid.astype(jnp.int32))


def position_metrics(counts: jax.Array, patch: int) -> dict[str, jax.Array]:
    """[p*p] assignments per position -> the live positions and each position's share of assignments
    (`bridge_position_share/r{row}c{col}`; the first logged step where a share is > 0 is when that
    position was first selected, to the logging interval)."""
    share = counts / jnp.maximum(counts.sum(), 1)
    metrics = {"bridge_live_positions": jnp.sum(counts > 0)}
    metrics.update({f"bridge_position_share/r{j // patch}c{j % patch}": share[j] for j in range(patch * patch)})
    return metrics


def recent_assignments(window: jax.Array, position: jax.Array, recent: int) -> jax.Array:
    """The `recent` most recently written slots of the usage ring buffer (`usage.push`: `position` is
    the next slot to write), oldest first; -1 where not yet written."""
    size = window.shape[0]
    return window[(position - min(recent, size) + jnp.arange(min(recent, size))) % size]


def dead_positions(assignments: jax.Array, num_codes: int, patch: int) -> jax.Array:
    """[p*p] bool: positions with no assignment among `assignments` [N], once all N slots are written
    (before that, nothing counts as dead)."""
    filled = jnp.all(assignments >= 0)
    return filled & (position_counts(assignments, num_codes, patch) == 0)


def _rows(array: jax.Array, num_positions: int) -> jax.Array:
    """Head kernel [H, P*D] -> [H, P, D], or bias [P*D] -> [P, D]: one slice per position."""
    return array.reshape(*array.shape[:-1], num_positions, -1)


def replace_rows(array: jax.Array, dead: jax.Array, replacement: jax.Array) -> jax.Array:
    """A head-shaped array (kernel, bias or one of their optimizer moments) with the dead positions'
    slices taken from `replacement` (same shape); the live slices come back bit for bit."""
    rows = _rows(array, dead.size)
    mask = dead.reshape((1,) * (rows.ndim - 2) + (-1, 1))
    return jnp.where(mask, _rows(replacement, dead.size), rows).reshape(array.shape)


def reseeded(array: jax.Array, source: jax.Array, num_positions: int, key: jax.Array, noise: float) -> jax.Array:
    """The head kernel or bias with every position's slice set to the source position's slice plus
    Gaussian noise of `noise` x its RMS (so the copies differ and the search splits between them)."""
    rows = _rows(array, num_positions)
    src = jnp.take(rows, source, axis=-2)[..., None, :]
    scale = noise * jnp.sqrt(jnp.mean(jnp.square(src)))
    return (src + scale * jax.random.normal(key, rows.shape, rows.dtype)).reshape(array.shape)


def map_head(tree: Any, fn: Callable[[str, jax.Array], jax.Array]) -> Any:
    """`fn(field, array)` on the head's kernel and bias wherever they appear in `tree` (parameters, each
    optimizer moment that mirrors them, their EMA); every other leaf unchanged."""
    def visit(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, DictKey))
        if len(keys) >= 4 and keys[-4:-1] == HEAD_PATH and keys[-1] in ("kernel", "bias"):
            return fn(keys[-1], leaf)
        return leaf
    return jax.tree_util.tree_map_with_path(visit, tree)


def revive_dead_positions(state, step: jax.Array, *, num_codes: int, patch: int, recent: int, noise: float,
                          seed: int) -> tuple[Any, jax.Array]:
    """Re-seed the head rows of the dead in-patch positions of a VQ tokenizer's bridge (see module doc).

    state: a TrainState whose model is the tokenizer (params, opt_state, ema_params, model_state).
    recent: how many of the latest assignments in the usage window decide (the trainer passes
    revive_every steps' worth): a position also dies during training, and the whole window (65,536
    assignments, 128 steps at 512 tokens a step) would notice only that many steps later.
    Returns (state, dead [p*p] bool: the positions re-seeded). The source is the position with the
    most of those assignments; the noise key is fold_in(key(seed), step). Adam's moments of the
    re-seeded rows restart from zero; the EMA, when kept, takes the re-seeded rows as they are (it
    would otherwise keep the dead tie for thousands of steps).
    """
    quantizer = state.model_state["quantizer"]
    assignments = recent_assignments(quantizer["usage_buffer"][...], quantizer["usage_position"][...], recent)
    dead = dead_positions(assignments, num_codes, patch)
    source = jnp.argmax(position_counts(assignments, num_codes, patch))
    keys = dict(zip(("kernel", "bias"), jax.random.split(jax.random.fold_in(jax.random.key(seed), step))))
    head = state.params[HEAD_PATH[0]][HEAD_PATH[1]][HEAD_PATH[2]]
    new = {field: replace_rows(head[field][...], dead, reseeded(head[field][...], source, dead.size, keys[field], noise))
           for field in ("kernel", "bias")}
    params = map_head(state.params, lambda field, x: new[field])
    ema = None if state.ema_params is None else map_head(
        state.ema_params, lambda field, x: replace_rows(x, dead, new[field]))
    opt_state = map_head(state.opt_state, lambda field, x: replace_rows(x, dead, jnp.zeros_like(x)))
    return state.replace(params=params, opt_state=opt_state, ema_params=ema), dead

"""In-patch positions of a VQBridge: counts from the usage window (against numpy), and their revival."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fvq_jax.evaluation.codebook_health import bridge_position_usage
from fvq_jax.quantizers import bridge_positions, usage
from fvq_jax.train.state import TrainState, model_fields
from tests.quantizers import tiny_model

K, P = 64, 2  # tiny_model's quantizer: an 8 x 8 grid, XS/2 bridge


def _numpy_position_counts(window, num_codes, patch):
    """Assignments per in-patch position, row-major, via the grid layout of fvq_method.md."""
    side = int(np.sqrt(num_codes))
    window = window[window >= 0]
    counts = np.bincount(window, minlength=num_codes).reshape(side // patch, patch, side // patch, patch)
    return counts.sum(axis=(0, 2)).reshape(-1)


@pytest.mark.parametrize("num_codes,patch", [(64, 2), (1024, 4), (4096, 8)])
def test_position_counts_match_numpy(num_codes, patch):
    rng = np.random.default_rng(0)
    window = rng.integers(0, num_codes, 5000)
    window[:700] = -1  # empty slots
    window[rng.random(5000) < 0.3] = 5  # one heavily used code
    got = np.asarray(bridge_positions.position_counts(jnp.asarray(window, jnp.int32), num_codes, patch))
    want = _numpy_position_counts(window, num_codes, patch)
    np.testing.assert_array_equal(got, want)
    metrics = jax.device_get(bridge_positions.position_metrics(jnp.asarray(got), patch))
    shares = np.array([metrics[f"bridge_position_share/r{j // patch}c{j % patch}"] for j in range(patch * patch)])
    np.testing.assert_allclose(shares, want / want.sum(), rtol=1e-6)
    assert metrics["bridge_live_positions"] == np.sum(want > 0)
    # The same live positions as codebook_health's per-position usage over the code counts.
    used = bridge_position_usage(np.bincount(window[window >= 0], minlength=num_codes), patch).reshape(-1)
    np.testing.assert_array_equal(used > 0, want > 0)


def test_recent_assignments_are_the_latest_slots_of_the_ring_buffer():

    buffer, position = usage.init_window(10)
    for start in (0, 4, 8):  # 12 indices pushed into 10 slots: the buffer wraps
        buffer, position = usage.push(buffer, position, jnp.arange(start, start + 4))
    np.testing.assert_array_equal(np.asarray(bridge_positions.recent_assignments(buffer, position, 5)), [7, 8, 9, 10, 11])
    np.testing.assert_array_equal(np.asarray(bridge_positions.recent_assignments(buffer, position, 99)), np.arange(2, 12))
    fresh, position = usage.push(*usage.init_window(10), jnp.arange(3))
    np.testing.assert_array_equal(np.asarray(bridge_positions.recent_assignments(fresh, position, 4)), [-1, 0, 1, 2])


def test_dead_positions_wait_for_a_full_window():
    side = 8
    live = [r * side + c for r in range(side) for c in range(side) if (r % 2, c % 2) != (1, 1)]
    window = np.resize(np.array(live), 256).astype(np.int32)
    full = bridge_positions.dead_positions(jnp.asarray(window), K, P)
    np.testing.assert_array_equal(np.asarray(full), [False, False, False, True])
    window[-1] = -1
    np.testing.assert_array_equal(np.asarray(bridge_positions.dead_positions(jnp.asarray(window), K, P)), False)


def _state(window, seed=0):
    """A TrainState of the tiny tokenizer with a random head (and random Adam moments) and `window`."""
    model = tiny_model.tiny_vqgan(type="vq", projector="XS/2", usage_window=len(window))
    head = model.quantizer.projector.head
    k1, k2 = jax.random.split(jax.random.key(seed))
    head.kernel[...] = jax.random.normal(k1, head.kernel.shape)
    head.bias[...] = jax.random.normal(k2, head.bias.shape)
    model.quantizer.usage_buffer[...] = jnp.asarray(window, jnp.int32)
    tx = optax.adam(1e-3)
    _, fields = model_fields(model, tx, keep_ema=True)
    state = TrainState(**fields)
    # Non-zero moments everywhere, so zeroing shows.
    opt_state = jax.tree.map(lambda x: x + 1.0 if x.dtype == jnp.float32 else x, state.opt_state)
    return state.replace(opt_state=opt_state)


def _head(tree):
    head = tree["quantizer"]["projector"]["head"]
    return {f: np.asarray(head[f][...]) for f in ("kernel", "bias")}


def test_revive_reseeds_dead_positions_and_leaves_the_rest_untouched():
    side = 8
    # Position 3 (1, 1) unused; position 0 used most (the source).
    cells = [r * side + c for r in range(side) for c in range(side) if (r % 2, c % 2) != (1, 1)]
    window = np.concatenate([np.resize(np.array(cells), 300), np.zeros(100, int)])
    state = _state(window)
    d = state.params["quantizer"]["projector"]["head"]["kernel"].shape[-1] // (P * P)
    new, dead = bridge_positions.revive_dead_positions(state, jnp.asarray(7), num_codes=K, patch=P, recent=len(window),
                                                       noise=0.01, seed=0)
    np.testing.assert_array_equal(np.asarray(dead), [False, False, False, True])
    before, after = _head(state.params), _head(new.params)
    for field in ("kernel", "bias"):
        rows_before = before[field].reshape(*before[field].shape[:-1], P * P, d)
        rows_after = after[field].reshape(rows_before.shape)
        # Live positions bit for bit; the dead one near the source (position 0), not equal to it.
        np.testing.assert_array_equal(rows_after[..., :3, :], rows_before[..., :3, :])
        diff = rows_after[..., 3, :] - rows_before[..., 0, :]
        rms = np.sqrt(np.mean(rows_before[..., 0, :] ** 2))
        assert 0 < np.abs(diff).max() and np.std(diff) == pytest.approx(0.01 * rms, rel=0.3)
        np.testing.assert_array_equal(_head(new.ema_params)[field], after[field])
    # Adam's moments: the dead rows zeroed, everything else as it was.
    for moment in ("mu", "nu"):
        m_before, m_after = _head(getattr(state.opt_state[0], moment)), _head(getattr(new.opt_state[0], moment))
        for field in ("kernel", "bias"):
            rows_before = m_before[field].reshape(*m_before[field].shape[:-1], P * P, d)
            rows_after = m_after[field].reshape(rows_before.shape)
            np.testing.assert_array_equal(rows_after[..., 3, :], 0.0)
            np.testing.assert_array_equal(rows_after[..., :3, :], rows_before[..., :3, :])
    # Nothing outside the head changes.
    for name in ("encoder", "decoder"):
        jax.tree.map(np.testing.assert_array_equal, new.params[name], state.params[name])
    # The noise depends on the step: another step re-seeds differently.
    other, _ = bridge_positions.revive_dead_positions(state, jnp.asarray(8), num_codes=K, patch=P, recent=len(window),
                                                       noise=0.01, seed=0)
    assert not np.array_equal(_head(other.params)["kernel"], after["kernel"])


def test_revive_without_dead_positions_changes_nothing():
    window = np.arange(K).repeat(2)
    state = _state(window)
    new, dead = bridge_positions.revive_dead_positions(state, jnp.asarray(3), num_codes=K, patch=P, recent=len(window),
                                                       noise=0.01, seed=0)
    assert not np.asarray(dead).any()
    jax.tree.map(np.testing.assert_array_equal, (new.params, new.opt_state, new.ema_params),
                 (state.params, state.opt_state, state.ema_params))

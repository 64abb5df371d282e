"""Usage window (FIFO of recent assignments) and exact usage, against plain Python references."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fvq_jax.quantizers import usage
from fvq_jax.quantizers.vq import VectorQuantizer


def test_default_window_follows_fvq():
    assert usage.default_window(16384) == 65536
    assert usage.default_window(65535) == 65536
    assert usage.default_window(65536) == 65537
    assert usage.default_window(262144) == 262145


@pytest.mark.parametrize("window,batch", [(10, 3), (10, 10), (10, 25), (7, 4)])
def test_window_keeps_the_newest_assignments(window, batch):
    k = 12
    rng = np.random.default_rng(0)
    reference = collections.deque(maxlen=window)
    buffer, position = usage.init_window(window)
    push = jax.jit(usage.push)
    for _ in range(9):
        idx = rng.integers(0, k, size=batch)
        reference.extend(idx.tolist())
        buffer, position = push(buffer, position, jnp.asarray(idx))
        got = [i for i in np.asarray(buffer).tolist() if i >= 0]
        assert sorted(got) == sorted(reference)
        want_usage = len(set(reference)) / k
        np.testing.assert_allclose(float(usage.window_usage(buffer, k)), want_usage, rtol=1e-6)


def test_empty_slots_do_not_count():
    buffer, position = usage.init_window(100)
    buffer, position = usage.push(buffer, position, jnp.asarray([5, 5, 7]))
    assert float(usage.window_usage(buffer, 16)) == pytest.approx(2 / 16)
    assert int(position) == 3


def test_usage_counter_exact_union():
    counter = usage.UsageCounter(10)
    counter.update(np.array([[0, 1], [1, 3]]))
    counter.update(np.array([3, 3, 9]))
    assert counter.total == 7
    assert counter.usage == pytest.approx(4 / 10)
    assert counter.dead_codes == 6
    p = np.array([1, 2, 3, 1]) / 7
    assert counter.perplexity == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\)"):
        counter.update(np.array([10]))


def test_quantizer_tracks_usage_only_in_training():
    q = VectorQuantizer(64, 4, projector="none", usage_window=50, rngs=nnx.Rngs(0))
    q.embedding[...] = jnp.asarray(np.random.default_rng(0).normal(size=(64, 4)), jnp.float32)
    z = jnp.asarray(q.embedding[...][:8].reshape(1, 2, 4, 4))  # hits codes 0..7 exactly
    q(z, train=False)
    assert int(q.usage_position[...]) == 0
    out = q(z, train=True)
    np.testing.assert_array_equal(np.asarray(out["indices"]).reshape(-1), np.arange(8))
    assert float(out["usage"]) == pytest.approx(8 / 64)
    assert int(q.usage_position[...]) == 8

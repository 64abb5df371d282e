"""EMA-codebook VQ: the update against numpy over two steps, no gradient to the codebook,
state carried through a jitted train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.quantizers.ema import EMAQuantizer, EMAState
from tests.quantizers import tiny_model

K, D = 64, 8


def _numpy_ema_step(state, z, decay, eps, l2_norm):
    """One step of the reference: search the current codebook, then update N, S, e."""
    cluster_size, code_sum, codebook = state
    z = z.reshape(-1, D).astype(np.float64)
    if l2_norm:
        z = z / np.linalg.norm(z, axis=-1, keepdims=True)
        searched = codebook / np.linalg.norm(codebook, axis=-1, keepdims=True)
    else:
        searched = codebook
    idx = ((z[:, None] - searched[None]) ** 2).sum(-1).argmin(-1)
    counts = np.bincount(idx, minlength=K)
    sums = np.zeros((K, D))
    np.add.at(sums, idx, z)
    cluster_size = decay * cluster_size + (1 - decay) * counts
    code_sum = decay * code_sum + (1 - decay) * sums
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + K * eps) * n
    return idx, (cluster_size, code_sum, code_sum / smoothed[:, None])


@pytest.mark.parametrize("l2_norm", [False, True])
def test_update_matches_numpy_after_two_steps(l2_norm):
    decay, eps = 0.9, 1e-5
    q = EMAQuantizer(K, D, decay=decay, epsilon=eps, l2_norm=l2_norm, rngs=nnx.Rngs(0))
    e0 = np.asarray(q.embedding[...], np.float64)
    state = (np.ones(K), e0, e0)  # the documented start: N = 1, S = E0
    step = nnx.jit(lambda q, z: q(z, train=True))
    for seed in (1, 2):
        z = 0.02 * jax.random.normal(jax.random.key(seed), (4, 4, 4, D))  # the scale of the U(-1/K, 1/K) codes
        out = step(q, z)
        want_idx, state = _numpy_ema_step(state, np.asarray(z), decay, eps, l2_norm)
        np.testing.assert_array_equal(np.asarray(out["indices"]).reshape(-1), want_idx)
        for got, want in zip((q.cluster_size, q.code_sum, q.embedding), state):
            np.testing.assert_allclose(np.asarray(got[...]), want, rtol=1e-5, atol=1e-7)
    assert len(np.unique(want_idx)) > 10
    assert np.any(state[0] < 0.9) and np.any(state[0] > 1.1)  # some codes decayed, some grew
    np.testing.assert_allclose(float(out["codebook_loss"]), 0.0)
    np.testing.assert_allclose(float(out["loss"]), float(out["commitment_loss"]))


def test_eval_forward_leaves_the_codebook_alone():
    q = EMAQuantizer(K, D, rngs=nnx.Rngs(0))
    before = np.asarray(q.embedding[...])
    q(0.02 * jax.random.normal(jax.random.key(0), (2, 4, 4, D)))
    np.testing.assert_array_equal(np.asarray(q.embedding[...]), before)
    np.testing.assert_array_equal(np.asarray(q.cluster_size[...]), 1.0)


def test_no_gradient_reaches_the_codebook():
    q = EMAQuantizer(K, D, rngs=nnx.Rngs(0))
    assert not jax.tree.leaves(nnx.state(q, nnx.Param))  # the optimizer has nothing to update
    assert isinstance(q.embedding, EMAState)
    graphdef, ema, rest = nnx.split(q, EMAState, ...)
    z = 0.02 * jax.random.normal(jax.random.key(0), (2, 4, 4, D))

    def loss(ema, z):
        return nnx.merge(graphdef, ema, rest)(z)["loss"]

    # Even treated as a differentiable input, the codebook gets no gradient; z does.
    grads = jax.grad(loss)(ema, z)
    for leaf in jax.tree.leaves(grads):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    assert float(jnp.abs(jax.grad(loss, argnums=1)(ema, z)).max()) > 0


def test_projector_other_than_none_is_rejected():
    with pytest.raises(config_lib.ConfigError, match="takes projector 'none'") as info:
        tiny_model.quantizer_config(type="ema", projector="S/4")
    assert info.value.field == "quantizer.projector"
    for decay in (0.0, 1.0):
        with pytest.raises(config_lib.ConfigError, match="quantizer.ema_decay"):
            tiny_model.quantizer_config(type="ema", projector="none", ema_decay=decay)


def test_tiny_vqgan_trains_and_decodes_codes():
    model = tiny_model.tiny_vqgan(type="ema", projector="none")
    initial = np.asarray(model.quantizer.embedding[...])
    images = tiny_model.smooth_images()
    losses = tiny_model.train(model, images)
    print("ema losses:", np.round(losses, 4))
    assert np.mean(losses[-3:]) < 0.7 * losses[0]
    # The EMA statistics were updated inside the jitted step and carried back into the model.
    assert float(np.abs(np.asarray(model.quantizer.embedding[...]) - initial).max()) > 1e-3
    # sum_k N_k is the EMA of the token count: N + (K - N) decay^steps, if every step was kept.
    tokens, decay = 2 * tiny_model.GRID ** 2, model.quantizer.decay
    want = tokens + (K - tokens) * decay ** len(losses)
    np.testing.assert_allclose(float(jnp.sum(model.quantizer.cluster_size[...])), want, rtol=1e-4)
    err, indices = tiny_model.decode_error(model, images)
    print(f"ema decode_codes max abs error: {err:.2e}")
    assert len(np.unique(indices)) > 1
    assert err < 1e-5

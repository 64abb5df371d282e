"""quantizer.restart='pull': dead codes from the usage window, the pull loss and its gradient against numpy."""

import jax
import jax.numpy as jnp
import numpy as np

from fvq_jax.quantizers import restart
from tests.nearest_codes import assert_same_codes
from tests.quantizers import tiny_model

K, D = 64, 8  # tiny_model's quantizer


def _window(rng, dead, size=512):
    """A full usage window over every code but `dead`."""
    live = np.setdiff1d(np.arange(K), dead)
    window = rng.choice(live, size)
    window[:len(live)] = live  # each live code at least once
    return window.astype(np.int32)


def test_dead_codes_from_the_window_against_numpy():
    rng = np.random.default_rng(0)
    window = _window(rng, dead=[0, 7, 63])
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(restart.dead_codes(jnp.asarray(window), K))), [0, 7, 63])
    np.testing.assert_array_equal(np.asarray(restart.window_counts(jnp.asarray(window), K)),
                                  np.bincount(window, minlength=K))
    window[3] = -1  # not yet full: nothing is dead (and an empty slot counts for no code, not code 63)
    assert not np.asarray(restart.dead_codes(jnp.asarray(window), K)).any()
    assert int(restart.window_counts(jnp.asarray(window), K)[K - 1]) == 0


def test_pull_loss_against_numpy_and_its_gradient():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(40, D)).astype(np.float32)
    codebook = rng.normal(size=(K, D)).astype(np.float32) * 3
    dead = np.zeros(K, bool)
    dead[[2, 9, 50]] = True
    nearest = np.argmin(((codebook[:, None] - z[None]) ** 2).sum(-1), axis=1)
    want = sum(((codebook[n] - z[nearest[n]]) ** 2).sum() for n in (2, 9, 50)) / z.size
    got = restart.pull_loss(jnp.asarray(z), jnp.asarray(codebook), jnp.asarray(dead))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # The gradient moves only the dead codes, each toward its nearest token; none reaches the tokens.
    g_codes, g_z = jax.grad(lambda c, t: restart.pull_loss(t, c, jnp.asarray(dead)), argnums=(0, 1))(
        jnp.asarray(codebook), jnp.asarray(z))
    g_codes = np.asarray(g_codes)
    np.testing.assert_array_equal(g_codes[~dead], 0.0)
    np.testing.assert_allclose(g_codes[dead], 2 * (codebook[dead] - z[nearest[dead]]) / z.size, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(g_z), 0.0)
    assert float(restart.pull_loss(jnp.asarray(z), jnp.asarray(codebook), jnp.zeros(K, bool))) == 0.0
    # More dead codes than tokens: the pull is shared out, in all as strong as one batch's codebook loss.
    many = np.arange(K) < 50
    want_many = sum(((codebook[n] - z[nearest[n]]) ** 2).sum() for n in range(50)) / (50 * D)
    np.testing.assert_allclose(float(restart.pull_loss(jnp.asarray(z), jnp.asarray(codebook), jnp.asarray(many))),
                               want_many, rtol=1e-5)


def test_pull_enters_the_quantizer_loss_only_when_on():
    model = tiny_model.tiny_vqgan(type="vq", projector="XS/2", restart="pull", restart_weight=2.0, usage_window=64)
    tiny_model.randomize_bridge_head(model)
    model.quantizer.usage_buffer[...] = jnp.arange(64, dtype=jnp.int32) % 32  # codes 32..63 dead
    z = jax.random.normal(jax.random.key(0), (2, 4, 4, D))
    codebook = model.quantizer.codebook(None)
    out = model.quantizer(z, train=True)
    dead = np.arange(K) >= 32
    want = 2.0 * float(restart.pull_loss(z.reshape(-1, D), codebook, jnp.asarray(dead)))
    assert int(out["pulled_codes"]) == 32
    np.testing.assert_allclose(float(out["pull_loss"]), want, rtol=1e-6)
    plain = model.quantizer.quantize(z, codebook)
    np.testing.assert_allclose(float(out["loss"]), float(plain["loss"]) + want, rtol=1e-6)
    off = tiny_model.tiny_vqgan(type="vq", projector="XS/2", usage_window=64)
    assert "pull_loss" not in off.quantizer(z, train=True)


def test_nearest_tokens_in_blocks_matches_one_search(monkeypatch):
    rng = np.random.default_rng(5)
    codes, tokens = rng.normal(size=(1000, 8)).astype(np.float32), rng.normal(size=(37, 8)).astype(np.float32)
    want = np.argmin(((codes[:, None] - tokens[None]) ** 2).sum(-1), axis=1)
    monkeypatch.setattr(restart, "PULL_CODE_CHUNK", 128)  # 8 blocks, the last one padded
    got = np.asarray(restart.nearest_tokens(jnp.asarray(codes), jnp.asarray(tokens)))
    # Exact where the nearest token is clear; a near-tie may go either way on another CPU's float path.
    assert_same_codes(got, want, codes, tokens)


def test_claim_loss_against_numpy_and_its_gradient():
    """'claim': each token picks its nearest dead code, which is pulled toward it (tiled search included)."""
    rng = np.random.default_rng(6)
    z = rng.normal(size=(40, D)).astype(np.float32)
    codebook = rng.normal(size=(K, D)).astype(np.float32) * 2
    dead = np.zeros(K, bool)
    dead[[3, 10, 20, 33, 60]] = True
    distances = ((z[:, None] - codebook[None]) ** 2).sum(-1)
    distances[:, ~dead] = np.inf
    picked = distances.argmin(1)
    want = ((codebook[picked] - z) ** 2).sum() / z.size
    for tile in (None, 16):
        got = restart.claim_loss(jnp.asarray(z), jnp.asarray(codebook), jnp.asarray(dead), tile_size=tile)
        np.testing.assert_allclose(float(got), want, rtol=1e-5)
    grad = np.asarray(jax.grad(lambda c: restart.claim_loss(jnp.asarray(z), c, jnp.asarray(dead)))(jnp.asarray(codebook)))
    want_grad = np.zeros_like(codebook)
    np.add.at(want_grad, picked, 2 * (codebook[picked] - z) / z.size)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
    assert not grad[~dead].any()
    # No dead code: nothing to claim.
    assert float(restart.claim_loss(jnp.asarray(z), jnp.asarray(codebook), jnp.zeros(K, bool))) == 0.0

"""quantizer.restart='split': dead codes land on busy ones; live codes, parameters and optimizer untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fvq_jax.quantizers import export, restart
from fvq_jax.train.state import TrainState, model_fields
from tests.quantizers import tiny_model

K, D = 64, 8  # tiny_model's quantizer


def _window(rng, dead, size=512):
    """A full usage window over every code but `dead`; code 5 takes a third of it."""
    live = np.setdiff1d(np.arange(K), dead)
    window = rng.choice(live, size)
    window[rng.random(size) < 0.33] = 5
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


def test_split_moves_dead_codes_onto_busy_ones_plus_noise():
    rng = np.random.default_rng(1)
    dead_ids = [0, 7, 20, 21, 63]
    window = _window(rng, dead=dead_ids)
    codes = jnp.asarray(rng.normal(size=(K, D)), jnp.float32)
    offset = jnp.asarray(rng.normal(size=(K, D)) * 0.1, jnp.float32)
    new, dead = restart.split_offsets(codes, offset, jnp.asarray(window), jax.random.key(0), 0.01)
    new, dead = np.asarray(new), np.asarray(dead)
    np.testing.assert_array_equal(np.flatnonzero(dead), dead_ids)
    live = ~dead
    np.testing.assert_array_equal(new[live], np.asarray(offset)[live])  # bit for bit
    moved = np.asarray(codes) - np.asarray(offset) + new  # the codes the search sees next
    counts = np.bincount(window, minlength=K)
    for n in dead_ids:
        distance = np.linalg.norm(moved[n] - np.asarray(codes), axis=-1)
        source = int(np.argmin(distance))
        assert counts[source] > 0, (n, source)  # onto a used code
        rms = np.sqrt(np.mean(np.asarray(codes)[source] ** 2))
        assert 0 < distance[source] < 0.05 * rms * np.sqrt(D), (n, distance[source])
    # Sources follow the window's counts: over many draws the busiest code (5, a third of the window) is
    # drawn about a third of the time, a dead code never.
    draws = np.asarray(jax.random.categorical(jax.random.key(1), jnp.log(jnp.asarray(counts, jnp.float32)),
                                              shape=(20000,)))
    assert abs(np.mean(draws == 5) - counts[5] / counts.sum()) < 0.02
    assert not np.isin(draws, dead_ids).any()


def _merge(graph, state):
    return nnx.merge(graph, state.params, state.model_state)


def _state(window):
    model = tiny_model.tiny_vqgan(type="vq", projector="XS/2", usage_window=len(window), restart="split")
    head = model.quantizer.projector.head
    head.kernel[...] = jax.random.normal(jax.random.key(3), head.kernel.shape)  # distinct codes
    model.quantizer.usage_buffer[...] = jnp.asarray(window, jnp.int32)
    _, fields = model_fields(model, optax.adam(1e-3), keep_ema=True)
    return model, TrainState(**fields)


def test_restart_writes_only_the_offsets_of_dead_codes():
    window = _window(np.random.default_rng(2), dead=[1, 2, 40])
    model, state = _state(window)
    graph = model_fields(model, optax.adam(1e-3), keep_ema=True)[0]
    before = np.asarray(model.quantizer.codebook())
    new, dead = restart.restart_dead_codes(state, jnp.asarray(25), graph=graph, noise=0.01, seed=0)
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(dead)), [1, 2, 40])
    jax.tree.map(np.testing.assert_array_equal, (new.params, new.opt_state, new.ema_params),
                 (state.params, state.opt_state, state.ema_params))
    quantizer = jax.tree_util.tree_map(np.asarray, new.model_state["quantizer"])
    np.testing.assert_array_equal(quantizer["usage_buffer"][...], window)
    after = np.asarray(_merge(graph, new).quantizer.codebook())
    live = np.setdiff1d(np.arange(K), [1, 2, 40])
    np.testing.assert_array_equal(after[live], before[live])
    for n in (1, 2, 40):  # each restarted code now sits next to a live code
        assert np.min(np.linalg.norm(after[n] - before[live], axis=-1)) < 0.05 * np.linalg.norm(before[live], axis=-1).max()
    # The baked export carries the offsets in its codebook (and drops them as state).
    restarted = _merge(graph, new)
    baked = export.bake_codebook(restarted.quantizer)
    assert not hasattr(baked, "code_offset")
    np.testing.assert_array_equal(np.asarray(baked.codebook()), after)


def test_zero_offsets_change_nothing():
    """A restart-enabled quantizer before any restart gives the method's codebook bit for bit."""
    plain = tiny_model.tiny_vqgan(type="vq", projector="XS/2")
    with_offsets = tiny_model.tiny_vqgan(type="vq", projector="XS/2", restart="split")
    assert not hasattr(plain.quantizer, "code_offset")
    np.testing.assert_array_equal(np.asarray(with_offsets.quantizer.codebook()), np.asarray(plain.quantizer.codebook()))


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
    np.testing.assert_array_equal(np.asarray(restart.nearest_tokens(jnp.asarray(codes), jnp.asarray(tokens))), want)

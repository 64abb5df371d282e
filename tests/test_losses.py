"""Pixel and adversarial losses against numpy, their gradients against hand-derived ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvq_jax import losses

RNG = np.random.default_rng(0)
REAL = (2.0 * RNG.normal(size=(3, 6, 6, 1))).astype(np.float32)
FAKE = (2.0 * RNG.normal(size=(3, 6, 6, 1)) - 0.5).astype(np.float32)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_pixel_loss_matches_numpy():
    x, y = RNG.normal(size=(2, 4, 4, 3)), RNG.normal(size=(2, 4, 4, 3))
    np.testing.assert_allclose(losses.pixel_loss(x, y), np.mean((x - y) ** 2), rtol=1e-6)
    np.testing.assert_allclose(losses.pixel_loss(x, y, "l1"), np.mean(np.abs(x - y)), rtol=1e-6)
    assert losses.pixel_loss(jnp.asarray(x, jnp.bfloat16), y).dtype == jnp.float32
    with pytest.raises(ValueError, match="'l2' or 'l1', got 'l3'"):
        losses.pixel_loss(x, y, "l3")


def test_discriminator_losses_match_numpy():
    hinge = 0.5 * (np.mean(np.maximum(0, 1 - REAL)) + np.mean(np.maximum(0, 1 + FAKE)))
    vanilla = 0.5 * (np.mean(np.logaddexp(0, -REAL)) + np.mean(np.logaddexp(0, FAKE)))
    np.testing.assert_allclose(losses.hinge_d_loss(REAL, FAKE), hinge, rtol=1e-6)
    np.testing.assert_allclose(losses.vanilla_d_loss(REAL, FAKE), vanilla, rtol=1e-6)
    # A confident, correct discriminator: hinge exactly 0, vanilla tends to 0.
    assert losses.hinge_d_loss(np.full(4, 1.5), np.full(4, -1.0)) == 0.0
    assert losses.vanilla_d_loss(np.full(4, 30.0), np.full(4, -30.0)) < 1e-12


def test_generator_losses_match_numpy():
    np.testing.assert_allclose(losses.hinge_g_loss(FAKE), -np.mean(FAKE), rtol=1e-6)
    np.testing.assert_allclose(losses.non_saturating_g_loss(FAKE), np.mean(np.logaddexp(0, -FAKE)), rtol=1e-6)
    # Stable at extreme logits: softplus(100) = 100, not inf.
    np.testing.assert_allclose(losses.non_saturating_g_loss(np.array([-100.0, 100.0])), 50.0, rtol=1e-6)


def test_discriminator_loss_gradients():
    n = REAL.size
    g_real, g_fake = jax.grad(losses.hinge_d_loss, argnums=(0, 1))(REAL, FAKE)
    np.testing.assert_allclose(g_real, -0.5 / n * (REAL < 1), rtol=1e-6)
    np.testing.assert_allclose(g_fake, 0.5 / n * (FAKE > -1), rtol=1e-6)
    g_real, g_fake = jax.grad(losses.vanilla_d_loss, argnums=(0, 1))(REAL, FAKE)
    np.testing.assert_allclose(g_real, -0.5 / n * _sigmoid(-REAL), rtol=1e-5)
    np.testing.assert_allclose(g_fake, 0.5 / n * _sigmoid(FAKE), rtol=1e-5)


def test_generator_loss_gradients():
    n = FAKE.size
    np.testing.assert_allclose(jax.grad(losses.hinge_g_loss)(FAKE), np.full_like(FAKE, -1.0 / n), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(losses.non_saturating_g_loss)(FAKE), -_sigmoid(-FAKE) / n, rtol=1e-5)


def test_registry():
    assert losses.d_loss_fn("hinge") is losses.hinge_d_loss
    assert losses.d_loss_fn("vanilla") is losses.vanilla_d_loss
    assert losses.g_loss_fn("hinge") is losses.hinge_g_loss
    assert losses.g_loss_fn("non_saturating") is losses.non_saturating_g_loss
    with pytest.raises(ValueError, match=r"unknown discriminator loss 'wgan'; choose from \['hinge', 'vanilla'\]"):
        losses.d_loss_fn("wgan")
    with pytest.raises(ValueError, match=r"unknown generator loss 'vanilla'; choose from \['hinge', 'non_sat"):
        losses.g_loss_fn("vanilla")


def test_adaptive_weight_matches_numpy_on_pytrees():
    nll = {"kernel": RNG.normal(size=(3, 3, 8, 3)), "bias": RNG.normal(size=(3,))}
    gan = {"kernel": 0.1 * RNG.normal(size=(3, 3, 8, 3)), "bias": 0.1 * RNG.normal(size=(3,))}
    flat = lambda t: np.concatenate([np.ravel(v) for v in t.values()])  # noqa: E731
    want = np.linalg.norm(flat(nll)) / (np.linalg.norm(flat(gan)) + 1e-4)
    np.testing.assert_allclose(losses.adaptive_weight(nll, gan), want, rtol=1e-5)
    np.testing.assert_allclose(losses.adaptive_weight(nll["kernel"], gan["kernel"]),
                               np.linalg.norm(nll["kernel"]) / (np.linalg.norm(gan["kernel"]) + 1e-4), rtol=1e-5)


def test_adaptive_weight_is_clipped_and_has_no_gradient():
    big, zero = jnp.ones((4, 4)), jnp.zeros((4, 4))
    assert losses.adaptive_weight(big, zero) == 1e4
    assert losses.adaptive_weight(big, zero, max_weight=50.0) == 50.0
    g_nll, g_gan = jax.grad(losses.adaptive_weight, argnums=(0, 1))(big, 0.5 * big)
    assert np.all(np.asarray(g_nll) == 0) and np.all(np.asarray(g_gan) == 0)


def test_disc_factor_switches_on_at_start_under_jit():
    steps = jnp.arange(8)
    got = jax.jit(jax.vmap(lambda s: losses.disc_factor(s, 5)))(steps)
    np.testing.assert_array_equal(np.asarray(got), (np.arange(8) >= 5).astype(np.float32))
    assert got.dtype == jnp.float32
    assert losses.disc_factor(0, 0) == 1.0

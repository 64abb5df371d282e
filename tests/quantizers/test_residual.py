"""Residual VQ: per-depth partial sums, losses and gradients against numpy; depth 1 is plain VQ."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.quantizers.residual import ResidualQuantizer
from fvq_jax.quantizers.vq import VectorQuantizer
from tests.quantizers import tiny_model

K, D = 64, 8


def _quantizer(depth, projector="lin/1", beta=0.25):
    q = ResidualQuantizer(K, D, depth=depth, projector=projector, beta=beta, rngs=nnx.Rngs(0))
    # Spread the raw codes so that later depths pick different codes from earlier ones.
    q.embedding[...] = jax.random.normal(jax.random.key(1), (K, D))
    if projector == "lin/1":
        # Every code carries lin/1's bias (torch-default init), so each depth would add it again and the
        # residual would stop shrinking: without it, the later depths refine.
        q.projector.layers[0].bias[...] = jnp.zeros_like(q.projector.layers[0].bias[...])
    return q


def _numpy_rvq(z, codebook, depth):
    """Independent reference: per depth argmin over explicit distances, partial sums, MSE to z."""
    z = z.reshape(-1, z.shape[-1]).astype(np.float64)
    codebook = codebook.astype(np.float64)
    residual, partial = z.copy(), np.zeros_like(z)
    indices, sums, mse = [], [], []
    for _ in range(depth):
        idx = ((residual[:, None] - codebook[None]) ** 2).sum(-1).argmin(-1)
        partial = partial + codebook[idx]
        residual = residual - codebook[idx]
        indices.append(idx)
        sums.append(partial.copy())
        mse.append(np.mean((partial - z) ** 2))
    return np.stack(indices, -1), sums, np.asarray(mse)


@pytest.fixture(scope="module")
def z():
    return jax.random.normal(jax.random.key(0), (2, 4, 4, D))


def test_matches_numpy_reference(z):
    depth, beta = 4, 0.3
    q = _quantizer(depth, beta=beta)
    out = nnx.jit(lambda q, z: q(z))(q, z)
    codebook = np.asarray(q.codebook())
    want_idx, want_sums, want_mse = _numpy_rvq(np.asarray(z), codebook, depth)
    np.testing.assert_array_equal(np.asarray(out["indices"]).reshape(-1, depth), want_idx)
    assert len(np.unique(want_idx[:, -1])) > 1 and want_mse[-1] < want_mse[0]
    np.testing.assert_allclose(np.asarray(out["z_q"]).reshape(-1, D), want_sums[-1], atol=1e-5)
    # Losses: averages over depths of the partial sums' MSE (commitment times beta).
    np.testing.assert_allclose(float(out["codebook_loss"]), want_mse.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(out["commitment_loss"]), beta * want_mse.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(out["loss"]), (1 + beta) * want_mse.mean(), rtol=1e-5)
    # lookup of the first d levels is the partial sum after depth d.
    for d in range(1, depth + 1):
        partial = q.lookup(out["indices"][..., :d])
        np.testing.assert_allclose(np.asarray(partial).reshape(-1, D), want_sums[d - 1], atol=1e-5)


def test_codebook_gradient_is_that_of_the_partial_sum_losses(z):
    """d codebook_loss / d E against the analytic gradient: code j at depth j gets the sum over
    depths d >= j of 2 (S_d - z) / (N D depth), scattered into its row."""
    depth = 3
    q = _quantizer(depth, projector="none")
    graphdef, params, rest = nnx.split(q, nnx.Param, ...)

    def losses(params, z):
        out = nnx.merge(graphdef, params, rest)(z)
        return out["codebook_loss"], out["commitment_loss"]

    grad_cb = jax.grad(lambda p: losses(p, z)[0])(params)["embedding"][...]
    grad_commit_e = jax.grad(lambda p: losses(p, z)[1])(params)["embedding"][...]
    grad_cb_z = jax.grad(lambda z: losses(params, z)[0])(z)

    codebook = np.asarray(q.codebook(), np.float64)
    idx, sums, _ = _numpy_rvq(np.asarray(z), codebook, depth)
    flat_z = np.asarray(z, np.float64).reshape(-1, D)
    scale = 2.0 / (flat_z.size * depth)
    want = np.zeros_like(codebook)
    for j in range(depth):
        g = sum(scale * (sums[d] - flat_z) for d in range(j, depth))
        np.add.at(want, idx[:, j], g)
    np.testing.assert_allclose(np.asarray(grad_cb), want, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(grad_commit_e), 0.0)  # commitment: stop-gradient on codes
    np.testing.assert_array_equal(np.asarray(grad_cb_z), 0.0)  # codebook loss: stop-gradient on z


def test_straight_through_on_the_final_sum(z):
    q = _quantizer(3)
    g = jax.grad(lambda z: jnp.sum(q(z)["z_q"] * jnp.arange(D)))(z)
    np.testing.assert_allclose(np.asarray(g), np.broadcast_to(np.arange(D, dtype=np.float32), z.shape))


def test_first_depth_is_plain_vq(z):
    kw = dict(projector="lin/1", entropy_weight=0.1)
    rvq = ResidualQuantizer(K, D, depth=1, **kw, rngs=nnx.Rngs(3))
    vq = VectorQuantizer(K, D, **kw, rngs=nnx.Rngs(3))  # same init order, same parameters
    np.testing.assert_array_equal(np.asarray(rvq.codebook()), np.asarray(vq.codebook()))
    z = z * 0.05  # the scale of these codes
    got, want = rvq(z, train=True), vq(z, train=True)
    np.testing.assert_array_equal(np.asarray(got["indices"][..., 0]), np.asarray(want["indices"]))
    assert len(np.unique(np.asarray(want["indices"]))) > 1
    for key in ("z_q", "codebook_loss", "commitment_loss", "entropy_loss", "loss", "perplexity", "usage"):
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-6, atol=1e-7, err_msg=key)
    # Deeper levels start from the same first choice.
    deep = ResidualQuantizer(K, D, depth=4, **kw, rngs=nnx.Rngs(3))(z)
    np.testing.assert_array_equal(np.asarray(deep["indices"][..., 0]), np.asarray(want["indices"]))


def test_usage_counts_every_depth():
    q = ResidualQuantizer(K, D, depth=2, projector="none", usage_window=64, rngs=nnx.Rngs(0))
    q.embedding[...] = jnp.eye(K, D) * 10  # only codes 0..7 are non-zero
    z = jnp.zeros((1, 1, 2, D)).at[0, 0, 0, 0].set(10.0).at[0, 0, 1, 1].set(10.2)
    out = q(z, train=True)
    # depth 0 picks codes 0 and 1; the residuals (0 and 0.2 e1) then pick a zero code (8) and code 8.
    np.testing.assert_array_equal(np.asarray(out["indices"]).reshape(2, 2), [[0, 8], [1, 8]])
    np.testing.assert_allclose(float(out["usage"]), 3 / K)


def test_l2_norm_is_rejected_by_the_config_check():
    with pytest.raises(config_lib.ConfigError, match="residuals, which are not unit vectors") as info:
        tiny_model.quantizer_config(type="residual", l2_norm=True)
    assert info.value.field == "quantizer.l2_norm"
    with pytest.raises(config_lib.ConfigError, match="quantizer.residual_depth"):
        tiny_model.quantizer_config(type="residual", residual_depth=0)


def test_tiny_vqgan_trains_and_decodes_codes():
    model = tiny_model.tiny_vqgan(type="residual")
    images = tiny_model.smooth_images()
    losses = tiny_model.train(model, images)
    print("residual losses:", np.round(losses, 4))
    assert np.mean(losses[-3:]) < 0.7 * losses[0]
    err, indices = tiny_model.decode_error(model, images)
    print(f"residual decode_codes max abs error: {err:.2e}")
    assert indices.shape == (2, tiny_model.GRID, tiny_model.GRID, 3)
    assert len(np.unique(indices)) > 1
    assert err < 1e-5

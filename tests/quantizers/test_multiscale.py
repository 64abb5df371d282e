"""Multi-scale (VAR-style) quantizer: area resampling against PyTorch, the phi schedule against
VAR's float rule, the whole forward against an independent numpy implementation, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.models.factory import VQGANSpec
from fvq_jax.quantizers import multiscale
from fvq_jax.quantizers.multiscale import MultiScaleQuantizer
from fvq_jax.train import tokenizer
from tests.quantizers import tiny_model

K, D = 64, 8


@pytest.mark.parametrize("size_in,size_out", [(16, 1), (16, 3), (16, 5), (16, 6), (16, 10), (16, 13), (8, 3), (8, 5)])
def test_area_downsample_matches_torch(size_in, size_out):
    x = np.random.default_rng(size_out).normal(size=(2, size_in, size_in, 3)).astype(np.float32)
    got = multiscale.area_downsample(jnp.asarray(x), size_out)
    want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(size_out, size_out), mode="area")
    np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)


def test_phi_index_follows_var():
    # VAR: linspace(1/(3P), 1 - 1/(3P), P) ticks, nearest to k / (n - 1) in float64.
    ticks = np.linspace(1 / 12, 11 / 12, 4)
    for n in range(2, 17):
        want = [int(np.argmin(np.abs(ticks - k / (n - 1)))) for k in range(n)]
        assert [multiscale.phi_index(k, n, 4) for k in range(n)] == want, n
    assert [multiscale.phi_index(k, 10, 4) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert multiscale.phi_index(0, 1, 4) == 0 and multiscale.phi_index(3, 5, 1) == 0


def _numpy_conv3x3(x, kernel, bias):
    """SAME 3x3 convolution, NHWC, HWIO kernel, explicit loops over the taps."""
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.broadcast_to(bias, (b, h, w, kernel.shape[-1])).astype(np.float64)
    for i in range(3):
        for j in range(3):
            out = out + padded[:, i:i + h, j:j + w] @ kernel[i, j]
    return out


def _numpy_multiscale(z, codebook, scales, phis):
    """Independent reference of the algorithm: torch area pooling, explicit distances, numpy phi.
    Bicubic upsampling is jax.image.resize by specification."""
    grid, n = scales[-1], len(scales)
    z = z.astype(np.float64)
    residual, f_hat = z.copy(), np.zeros_like(z)
    indices, mse = [], []
    for k, s in enumerate(scales):
        if s == grid:
            tokens = residual
        else:
            pooled = F.adaptive_avg_pool2d(torch.from_numpy(residual).permute(0, 3, 1, 2), s)
            tokens = pooled.permute(0, 2, 3, 1).numpy()
        flat = tokens.reshape(-1, tokens.shape[-1])
        idx = ((flat[:, None] - codebook[None]) ** 2).sum(-1).argmin(-1)
        codes = codebook[idx].reshape(tokens.shape)
        if s != grid:
            codes = np.asarray(jax.image.resize(jnp.asarray(codes, jnp.float32), z.shape, "bicubic"), np.float64)
        kernel, bias = phis[multiscale.phi_index(k, n, len(phis))]
        h = 0.5 * codes + 0.5 * _numpy_conv3x3(codes, kernel, bias)
        f_hat, residual = f_hat + h, residual - h
        indices.append(idx.reshape(tokens.shape[:-1]))
        mse.append(np.mean((f_hat - z) ** 2))
    return indices, f_hat, np.asarray(mse)


def test_matches_numpy_reference():
    scales = (1, 2, 3, 5, 8)
    q = MultiScaleQuantizer(K, D, scales=scales, projector="lin/1", beta=0.25, rngs=nnx.Rngs(0))
    q.embedding[...] = jax.random.normal(jax.random.key(1), (K, D))
    z = jax.random.normal(jax.random.key(0), (2, 8, 8, D))
    out = nnx.jit(lambda q, z: q(z))(q, z)
    phis = [(np.asarray(p.conv.kernel[...], np.float64), np.asarray(p.conv.bias[...], np.float64)) for p in q.phis]
    codebook = np.asarray(q.codebook(), np.float64)
    want_idx, want_f_hat, want_mse = _numpy_multiscale(np.asarray(z), codebook, scales, phis)
    assert out["indices"].shape == (2, sum(s * s for s in scales))
    for got, want in zip(multiscale.split_scales(out["indices"], scales), want_idx):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert len(np.unique(want_idx[-1])) > 1
    print("multiscale z_q vs numpy: max abs error", np.abs(np.asarray(out["z_q"]) - want_f_hat).max())
    np.testing.assert_allclose(np.asarray(out["z_q"]), want_f_hat, atol=1e-5)
    np.testing.assert_allclose(float(out["codebook_loss"]), want_mse.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(out["commitment_loss"]), 0.25 * want_mse.mean(), rtol=1e-5)
    # The decode path (bridged codebook, upsample, phi) rebuilds the forward's z_q.
    z_q = nnx.jit(lambda q, i: q.lookup(i))(q, out["indices"])
    np.testing.assert_allclose(np.asarray(z_q), np.asarray(out["z_q"]), atol=1e-6)


def test_codebook_and_phi_train_through_the_codebook_loss_only():
    q = MultiScaleQuantizer(K, D, scales=(1, 2, 4), projector="lin/1", rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(q, nnx.Param, ...)
    z = jax.random.normal(jax.random.key(0), (1, 4, 4, D))

    def loss(params, z, key):
        return nnx.merge(graphdef, params, rest)(z)[key]

    g_cb = jax.grad(loss)(params, z, "codebook_loss")
    g_commit = jax.grad(loss)(params, z, "commitment_loss")
    for path in (("phis", 0, "conv", "kernel"), ("projector", "layers", 0, "kernel"), ("embedding",)):
        node_cb, node_commit = g_cb, g_commit
        for p in path:
            node_cb, node_commit = node_cb[p], node_commit[p]
        assert float(jnp.abs(node_cb[...]).max()) > 0, path
        np.testing.assert_array_equal(np.asarray(node_commit[...]), 0.0)
    # Straight-through: the gradient of z_q with respect to z is the identity.
    np.testing.assert_allclose(np.asarray(jax.grad(lambda z: jnp.sum(q(z)["z_q"] * 2.0))(z)), 2.0)


def test_split_and_join_scales_round_trip():
    scales = (1, 2, 3)
    flat = jnp.arange(2 * 14).reshape(2, 14)
    maps = multiscale.split_scales(flat, scales)
    assert [m.shape for m in maps] == [(2, 1, 1), (2, 2, 2), (2, 3, 3)]
    np.testing.assert_array_equal(np.asarray(maps[2][1]), np.arange(14 + 5, 28).reshape(3, 3))
    np.testing.assert_array_equal(np.asarray(multiscale.join_scales(maps)), np.asarray(flat))
    with pytest.raises(ValueError, match=r"must be \[B, 14\]"):
        multiscale.split_scales(flat[:, :10], scales)


def test_scales_validation():
    for scales, message in (((1, 3, 2), "strictly increasing"), ((0, 2), "positive ints")):
        with pytest.raises(config_lib.ConfigError, match=message) as info:
            tiny_model.quantizer_config(type="multiscale", scales=scales)
        assert info.value.field == "quantizer.scales"
    q = MultiScaleQuantizer(K, D, scales=(1, 2, 4), projector="none", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="last scale must equal the token grid"):
        q(jnp.zeros((1, 8, 8, D)))
    # Config: the grid is known once the model is; the error names the field.
    cfg = tiny_model.quantizer_config(type="multiscale", scales=(1, 2, 4))
    spec = VQGANSpec(tiny_model.TINY, cfg)  # TINY downsamples by 2
    assert spec.token_grid(8) == 4
    with pytest.raises(config_lib.ConfigError, match=r"last scale must equal the 8 x 8 token grid") as info:
        spec.token_grid(16)
    assert info.value.field == "quantizer.scales"
    config = tiny_model.tokenizer_config()
    config.quantizer.type = "multiscale"
    config.data.image_size = 128  # local model: /4 -> 32 x 32 tokens, default scales end at 16
    with pytest.raises(config_lib.ConfigError, match="quantizer.scales"):
        tokenizer.resolve(config)
    with pytest.raises(config_lib.ConfigError, match="quantizer.l2_norm"):
        tiny_model.quantizer_config(type="multiscale", l2_norm=True)


def test_tiny_vqgan_trains_and_decodes_codes():
    model = tiny_model.tiny_vqgan(type="multiscale")
    images = tiny_model.smooth_images()
    losses = tiny_model.train(model, images)
    print("multiscale losses:", np.round(losses, 4))
    assert np.mean(losses[-3:]) < 0.7 * losses[0]
    assert float(jnp.abs(model.quantizer.projector.head.kernel[...]).max()) > 0  # the bridge trained
    err, indices = tiny_model.decode_error(model, images)
    print(f"multiscale decode_codes max abs error: {err:.2e}")
    assert indices.shape == (2, sum(s * s for s in tiny_model.TINY_SCALES))
    assert len(np.unique(indices)) > 1
    assert err < 1e-5

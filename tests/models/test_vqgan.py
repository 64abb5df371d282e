"""VQ-GAN shapes, parameter counts, encode/decode round trips, the layers against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fvq_jax.models import layers
from fvq_jax.models.vqgan import VQGAN, VQGAN_PRESETS, VQGANArch, param_breakdown
from fvq_jax.quantizers.vq import VectorQuantizer

TINY = VQGANArch(ch=16, ch_mult=(1, 2), enc_blocks=1, dec_blocks=1, z_channels=16, norm_groups=4)


def _abstract_vqgan(preset, k=16384, d=256, bridge="L/4"):
    return nnx.eval_shape(lambda: VQGAN(VQGAN_PRESETS[preset], VectorQuantizer(k, d, projector=bridge, rngs=nnx.Rngs(0)),
                                        rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("preset,grid", [("VQ-16", 16), ("VQ-8", 32)])
def test_token_grid_at_256(preset, grid):
    model = _abstract_vqgan(preset)
    graphdef, state = nnx.split(model)

    def encode(state, x):
        return nnx.merge(graphdef, state).encode(x)

    images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    z_q, indices, aux = jax.eval_shape(encode, state, images)
    assert z_q.shape == (2, grid, grid, 256)
    assert indices.shape == (2, grid, grid) and indices.dtype == jnp.int32

    def decode(state, idx):
        return nnx.merge(graphdef, state).decode_codes(idx)

    assert jax.eval_shape(decode, state, indices).shape == (2, 256, 256, 3)


def test_vq16_parameter_count_matches_reference():
    counts = param_breakdown(_abstract_vqgan("VQ-16"))
    for name, n in counts.items():
        print(f"{name:>28}: {n:>12,}")
    enc_dec = counts["encoder"] + counts["decoder"] + counts["quant_conv+post_quant_conv"]
    print(f"{'encoder+decoder':>28}: {enc_dec:>12,}")
    assert abs(enc_dec - 71.9e6) / 71.9e6 < 0.01  # LlamaGen VQ-16: 72M
    assert counts["quantizer"] == 16384 * 256 + counts["of which projector"]
    assert counts["of which projector"] == 3_153_664


def test_encode_decode_round_trip():
    model = VQGAN(TINY, VectorQuantizer(64, 8, projector="XS/2", rngs=nnx.Rngs(1)), rngs=nnx.Rngs(0))
    # Random bridge head, so the 64 codes differ and the search has something to choose.
    head = model.quantizer.projector.head
    head.kernel[...] = jax.random.normal(jax.random.key(2), head.kernel.shape) * 0.02
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
    recon, aux = nnx.jit(lambda m, x: m(x))(model, x)
    assert recon.shape == x.shape and aux["indices"].shape == (2, 8, 8)
    assert len(np.unique(np.asarray(aux["indices"]))) > 1
    decoded = nnx.jit(lambda m, i: m.decode_codes(i))(model, aux["indices"])
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(recon), atol=1e-5)
    z_q, _, _ = nnx.jit(lambda m, x: m.encode(x))(model, x)
    np.testing.assert_allclose(np.asarray(z_q), np.asarray(model.quantizer.lookup(aux["indices"])), atol=1e-6)


def test_downsample_pads_right_and_bottom():
    down = layers.Downsample(2, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(1, 6, 6, 2)).astype(np.float32)
    k = np.asarray(down.conv.kernel[...])
    b = np.asarray(down.conv.bias[...])
    xp = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    want = np.zeros((1, 3, 3, 2))
    for i in range(3):
        for j in range(3):
            want[0, i, j] = np.einsum("hwc,hwco->o", xp[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3], k) + b
    np.testing.assert_allclose(np.asarray(down(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_upsample_is_nearest_then_conv():
    up = layers.Upsample(2, rngs=nnx.Rngs(0))
    up.conv.kernel[...] = jnp.zeros_like(up.conv.kernel[...]).at[1, 1].set(jnp.eye(2))  # identity 3x3 conv
    up.conv.bias[...] = jnp.zeros_like(up.conv.bias[...])
    x = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    want = x.repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_allclose(np.asarray(up(jnp.asarray(x))), want, atol=1e-6)


def test_attention_block_matches_numpy():
    attn = layers.AttnBlock(8, norm_groups=2, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, 3, 3, 8)).astype(np.float32)
    got = np.asarray(attn(jnp.asarray(x)))
    g = x.reshape(2, 9, 2, 4)
    normed = ((g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-6)).reshape(2, 9, 8)
    w = lambda conv: (np.asarray(conv.kernel[...])[0, 0], np.asarray(conv.bias[...]))  # noqa: E731
    q, k, v = ((normed @ w(c)[0] + w(c)[1]) for c in (attn.q, attn.k, attn.v))
    a = q @ k.transpose(0, 2, 1) / np.sqrt(8)
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    want = x + ((a @ v) @ w(attn.proj_out)[0] + w(attn.proj_out)[1]).reshape(2, 3, 3, 8)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="12 channels are not divisible by norm_groups=8"):
        layers.group_norm(12, 8, dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_bf16_compute_keeps_the_quantizer_in_float32():
    model = VQGAN(TINY, VectorQuantizer(64, 8, projector="XS/2", rngs=nnx.Rngs(1)), dtype=jnp.bfloat16,
                  rngs=nnx.Rngs(0))
    head = model.quantizer.projector.head
    head.kernel[...] = jax.random.normal(jax.random.key(2), head.kernel.shape) * 0.02
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)

    def run(m, x):
        z = m.quant_conv(m.encoder(x.astype(jnp.bfloat16)))
        z_q, indices, aux = m.encode(x)
        return z, z_q, indices, aux["loss"], m.decode(z_q)

    z, z_q, indices, loss, recon = nnx.jit(run)(model, x)
    assert z.dtype == jnp.bfloat16  # convolutions in bf16
    assert z_q.dtype == jnp.float32 and loss.dtype == jnp.float32 and recon.dtype == jnp.float32
    # The search ran in float32 on the bf16 features: the same indices as searching them directly.
    codebook = model.quantizer.codebook()
    want = jnp.argmin(jnp.sum((z.astype(jnp.float32)[..., None, :] - codebook) ** 2, -1), -1)
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(want))
    assert len(np.unique(np.asarray(indices))) > 1
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))

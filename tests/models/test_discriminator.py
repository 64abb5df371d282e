"""PatchGAN discriminator: shapes, init statistics, and parity with a torch re-implementation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.models.discriminator import PatchDiscriminator, logits_size
from fvq_jax.models.factory import DiscriminatorSpec, build_discriminator


def _abstract(size, **kw):
    model = nnx.eval_shape(lambda: PatchDiscriminator(**kw, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, train=False), state, x)


@pytest.mark.parametrize("size,num_layers,side", [(256, 3, 30), (64, 3, 6), (24, 3, 1), (32, 2, 6), (128, 4, 6)])
def test_logit_grid(size, num_layers, side):
    assert logits_size(size, num_layers) == side
    out = _abstract(size, num_layers=num_layers)
    assert out.shape == (2, side, side, 1) and out.dtype == jnp.float32


def test_too_small_input_is_rejected():
    with pytest.raises(ValueError, match="at least 24 pixels a side, got 16x16"):
        _abstract(16)


def test_parameter_count_matches_taming():
    model = nnx.eval_shape(lambda: PatchDiscriminator(rngs=nnx.Rngs(0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # conv 3->64 (+bias), 64->128, 128->256, 256->512, 512->1 (+bias), all 4x4, + 3 BN (scale, bias).
    assert n == 2_765_633


def test_init_statistics():
    model = PatchDiscriminator(rngs=nnx.Rngs(0))
    kernel = np.asarray(model.blocks[2].conv.kernel[...])  # 4 * 4 * 256 * 512 values
    assert abs(kernel.mean()) < 1e-4 and abs(kernel.std() - 0.02) < 2e-4
    scales = np.concatenate([np.asarray(b.norm.scale[...]) for b in model.blocks])  # 896 values
    assert abs(scales.mean() - 1.0) < 3e-3 and 0.018 < scales.std() < 0.022
    for b in model.blocks:
        assert b.conv.bias is None and np.all(np.asarray(b.norm.bias[...]) == 0)
        assert np.all(np.asarray(b.norm.mean[...]) == 0) and np.all(np.asarray(b.norm.var[...]) == 1)
    assert np.all(np.asarray(model.conv_in.bias[...]) == 0) and np.all(np.asarray(model.conv_out.bias[...]) == 0)


def _torch_copy(model: PatchDiscriminator) -> torch.nn.Sequential:
    """taming's NLayerDiscriminator built from torch layers, with the NNX weights copied in."""
    def conv(c):
        k = np.asarray(c.kernel[...])
        layer = torch.nn.Conv2d(k.shape[2], k.shape[3], 4, stride=c.strides[0], padding=1, bias=c.bias is not None)
        layer.weight.data = torch.from_numpy(k.transpose(3, 2, 0, 1).copy())  # HWIO -> OIHW
        if c.bias is not None:
            layer.bias.data = torch.from_numpy(np.asarray(c.bias[...]).copy())
        return layer

    def norm(n):
        layer = torch.nn.BatchNorm2d(n.num_features)  # eps 1e-5, momentum 0.1
        for name, value in (("weight", n.scale), ("bias", n.bias), ("running_mean", n.mean), ("running_var", n.var)):
            getattr(layer, name).data = torch.from_numpy(np.asarray(value[...]).copy())
        return layer

    layers = [conv(model.conv_in), torch.nn.LeakyReLU(0.2)]
    for b in model.blocks:
        layers += [conv(b.conv), norm(b.norm), torch.nn.LeakyReLU(0.2)]
    return torch.nn.Sequential(*layers, conv(model.conv_out))


@nnx.jit(static_argnames="train")
def _forward(model, x, train):
    return model(x, train=train)


def _nchw(x):
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def test_matches_torch_in_train_and_eval_mode():
    model = PatchDiscriminator(filters=16, rngs=nnx.Rngs(0))
    ref = _torch_copy(model)
    x = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))

    got = np.asarray(_forward(model, x, True))
    ref.train()
    with torch.no_grad():
        want = ref(_nchw(x)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    torch_norms = [m for m in ref if isinstance(m, torch.nn.BatchNorm2d)]
    positions = (4 * 16 * 16, 4 * 8 * 8, 4 * 7 * 7)  # n = B * H * W at each BatchNorm
    for b, t, n in zip(model.blocks, torch_norms, positions):
        np.testing.assert_allclose(np.asarray(b.norm.mean[...]), t.running_mean.numpy(), rtol=1e-4, atol=1e-6)
        # torch tracks the unbiased batch variance, flax the biased one: var * (n - 1) / n.
        biased = 0.9 + (t.running_var.numpy() - 0.9) * (n - 1) / n
        np.testing.assert_allclose(np.asarray(b.norm.var[...]), biased, rtol=1e-4, atol=1e-6)

    # Eval mode with distinct running statistics in both models.
    rng = np.random.default_rng(2)
    for b, t in zip(model.blocks, torch_norms):
        mean = rng.normal(0, 0.1, b.norm.mean.shape).astype(np.float32)
        var = rng.uniform(0.5, 2.0, b.norm.var.shape).astype(np.float32)
        b.norm.mean[...], b.norm.var[...] = mean, var
        t.running_mean.data, t.running_var.data = torch.from_numpy(mean), torch.from_numpy(var)
    got = np.asarray(_forward(model, x, False))
    ref.eval()
    with torch.no_grad():
        want = ref(_nchw(x)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(got - np.asarray(_forward(model, x, True))).max() > 1e-2  # eval really differs from train


def test_build_from_config():
    spec = DiscriminatorSpec.from_config(ml_collections.ConfigDict(dict(num_layers=2, filters=8)), "discriminator")
    model = nnx.eval_shape(lambda: build_discriminator(spec, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert len(model.blocks) == 2 and model.blocks[-1].conv.out_features == 32 and model.dtype == jnp.bfloat16
    assert model.blocks[0].conv.kernel.dtype == jnp.float32  # parameters stay float32


@pytest.mark.parametrize("field,value", [("num_layers", 0), ("filters", 2.5), ("filters", -1)])
def test_bad_config_names_the_field(field, value):
    cfg = ml_collections.ConfigDict({"num_layers": 3, "filters": 64, field: value})
    with pytest.raises(config_lib.ConfigError, match="must be an int > 0") as info:
        DiscriminatorSpec.from_config(cfg, "discriminator")
    assert info.value.field == f"discriminator.{field}"

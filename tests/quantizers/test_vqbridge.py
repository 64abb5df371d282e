"""VQBridge: layout, init, parameter counts and a numpy re-implementation of the forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fvq_jax.models.vqgan import count_params
from fvq_jax.quantizers import vqbridge


def _bridge(name, k, d, seed=0):
    return vqbridge.make_projector(name, k, d, rngs=nnx.Rngs(seed))


def _randomize(module, seed=1, scale=0.2):
    """Give every parameter (the zero-initialised head too) random values."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(module, jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))


def test_step0_output_is_all_zero():
    bridge = _bridge("S/4", 256, 16)
    e = jax.random.uniform(jax.random.key(0), (256, 16), minval=-1 / 256, maxval=1 / 256)
    np.testing.assert_array_equal(np.asarray(bridge(e)), 0.0)


@pytest.mark.parametrize("name,k,expected", [("L/4", 16384, 3.15e6), ("L/8", 262144, 9.46e6)])
def test_parameter_counts(name, k, expected):
    bridge = nnx.eval_shape(lambda: _bridge(name, k, 256))
    n = count_params(bridge)
    print(f"{name}: {n:,} parameters")
    assert abs(n - expected) / expected < 0.005


def test_init_scales():
    bridge = _bridge("B/4", 1024, 32)
    block = bridge.blocks[0]
    # Xavier-uniform bound sqrt(6 / (fan_in + fan_out)); qkv as one 3H x H matrix.
    for kernel, fan_in, fan_out in [(block.qkv.kernel, 128, 384), (block.fc1.kernel, 128, 256),
                                    (bridge.patch_embed.kernel, 4 * 4 * 32, 128)]:
        bound = np.sqrt(6 / (fan_in + fan_out))
        values = np.asarray(kernel[...])
        assert np.abs(values).max() <= bound
        assert np.abs(values).max() > 0.9 * bound
        np.testing.assert_allclose(values.std(), bound / np.sqrt(3), rtol=0.1)
    np.testing.assert_array_equal(np.asarray(block.qkv.bias[...]), 0.0)
    np.testing.assert_array_equal(np.asarray(bridge.head.kernel[...]), 0.0)
    np.testing.assert_array_equal(np.asarray(bridge.head.bias[...]), 0.0)


@pytest.mark.parametrize("n", [0, 5, 17, 63, 100, 255])
def test_code_n_is_grid_cell_row_major(n):
    """Plant a code; only the p x p block holding grid cell (n // 16, n % 16) lights up, brightest at n."""
    k, d, side, p = 256, 8, 16, 2
    bridge = _bridge("XS/2", k, d)  # H = 32 = p * p * D: patch embed and head can be identities
    eye = np.eye(p * p * d, dtype=np.float32)
    bridge.patch_embed.kernel[...] = jnp.asarray(eye.reshape(p, p, d, p * p * d))
    bridge.head.kernel[...] = jnp.asarray(eye)
    for block in bridge.blocks:  # residual branches off: blocks are identities
        for layer in (block.proj, block.fc2):
            layer.kernel[...] = jnp.zeros_like(layer.kernel[...])
    e = np.zeros((k, d), np.float32)
    e[n] = 1.0
    out = np.asarray(bridge(jnp.asarray(e)))
    lit = np.flatnonzero(np.abs(out).sum(-1) > 1e-6)
    row, col = n // side, n % side
    block_rows, block_cols = (row // p) * p + np.arange(p), (col // p) * p + np.arange(p)
    expected = sorted(r * side + c for r in block_rows for c in block_cols)
    np.testing.assert_array_equal(lit, expected)
    assert out.sum(-1).argmax() == n


def _np_layer_norm(x, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def _np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_bridge(bridge, e):
    """The bridge forward pass written out with explicit index arithmetic, in float64."""
    k, d = e.shape
    side, p = bridge.side, bridge.patch
    n = side // p
    w = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    pk, pb = w(bridge.patch_embed.kernel), w(bridge.patch_embed.bias)
    tokens = np.zeros((n * n, pk.shape[-1]))
    for code in range(k):
        r, c = divmod(code, side)
        t = (r // p) * n + (c // p)
        tokens[t] += e[code] @ pk[r % p, c % p]
    x = tokens + pb
    for block in bridge.blocks:
        heads = block.num_heads
        qkv = _np_layer_norm(x) @ w(block.qkv.kernel) + w(block.qkv.bias)
        q, kk, v = np.split(qkv, 3, axis=-1)
        hd = q.shape[-1] // heads
        outs = []
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            a = q[:, sl] @ kk[:, sl].T / np.sqrt(hd)
            a = np.exp(a - a.max(-1, keepdims=True))
            outs.append((a / a.sum(-1, keepdims=True)) @ v[:, sl])
        x = x + np.concatenate(outs, -1) @ w(block.proj.kernel) + w(block.proj.bias)
        hmid = _np_gelu_tanh(_np_layer_norm(x) @ w(block.fc1.kernel) + w(block.fc1.bias))
        x = x + hmid @ w(block.fc2.kernel) + w(block.fc2.bias)
    y = _np_layer_norm(x) @ w(bridge.head.kernel) + w(bridge.head.bias)  # [T, p*p*D]
    out = np.zeros((k, d))
    for code in range(k):
        r, c = divmod(code, side)
        t = (r // p) * n + (c // p)
        out[code] = y[t].reshape(p, p, d)[r % p, c % p]
    return out


@pytest.mark.parametrize("name,k,d", [("S/4", 256, 8), ("XS/2", 64, 4), ("L/2-d4", 1024, 8)])
def test_forward_matches_numpy_reference(name, k, d):
    bridge = _bridge(name, k, d)
    _randomize(bridge)
    e = np.random.default_rng(0).normal(size=(k, d)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(bridge(jnp.asarray(e)))
    want = _np_bridge(bridge, e.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_every_preset_builds_with_its_shape():
    for name, preset in vqbridge.BRIDGE_PRESETS.items():
        k = (preset.patch * 4) ** 2
        bridge = nnx.eval_shape(lambda: _bridge(name, k, 16))
        assert len(bridge.blocks) == preset.depth
        assert bridge.blocks[0].qkv.kernel.shape == (preset.width, 3 * preset.width)
        assert bridge.patch_embed.kernel.shape == (preset.patch, preset.patch, 16, preset.width)
    assert vqbridge.BRIDGE_PRESETS["L/4-d4"].depth == 4 and vqbridge.BRIDGE_PRESETS["XL/4"].width == 512
    assert set(vqbridge.PROJECTORS) >= {"none", "lin/1", "lin/5", "XS/2", "XL/8", "B/4-d1", "XL/4-d4", "L/2-d4"}


def test_ablation_projectors():
    e = jax.random.normal(jax.random.key(0), (64, 8))
    np.testing.assert_array_equal(np.asarray(_bridge("none", 64, 8)(e)), np.asarray(e))
    lin1 = _bridge("lin/1", 64, 8)
    want = np.asarray(e) @ np.asarray(lin1.layers[0].kernel[...]) + np.asarray(lin1.layers[0].bias[...])
    np.testing.assert_allclose(np.asarray(lin1(e)), want, rtol=1e-5, atol=1e-6)
    lin5 = _bridge("lin/5", 64, 8)
    x = np.asarray(e)
    for i, layer in enumerate(lin5.layers):
        x = (np.maximum(x, 0) if i else x) @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])
    np.testing.assert_allclose(np.asarray(lin5(e)), x, rtol=1e-4, atol=1e-5)
    # The ablations need no square codebook.
    assert _bridge("lin/1", 1000, 8)(jnp.ones((1000, 8))).shape == (1000, 8)


def test_bad_codebook_sizes_name_both_numbers():
    with pytest.raises(ValueError, match=r"codebook_size=1000 is not a perfect square"):
        _bridge("L/4", 1000, 8)
    with pytest.raises(ValueError, match=r"codebook side 36 \(codebook_size=1296\) is not divisible by the bridge patch size 8"):
        _bridge("L/8", 1296, 8)
    with pytest.raises(ValueError, match=r"unknown projector 'L/3'"):
        _bridge("L/3", 1024, 8)

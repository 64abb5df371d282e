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


@pytest.mark.parametrize("name,fan_in", [("lin/1", 256), ("lin/5", 48)])
def test_linear_projectors_take_torch_linear_default_init(name, fan_in):
    """Kernel and bias drawn as torch.nn.Linear's defaults: U(+-1/sqrt(fan_in)) each, not Xavier / zero."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    reference = torch.nn.Linear(fan_in, fan_in)
    want = {"kernel": reference.weight.detach().numpy(), "bias": reference.bias.detach().numpy()}
    bound = 1 / np.sqrt(fan_in)
    for layer in _bridge(name, 64, fan_in).layers:
        for field in ("kernel", "bias"):
            values, torch_values = np.asarray(getattr(layer, field)[...]), want[field]
            for v in (values, torch_values):
                assert np.abs(v).max() <= bound and np.abs(v).max() > 0.9 * bound
            # The same uniform distribution: std bound / sqrt(3) (sampling error ~ 1/sqrt(n)).
            rtol = 4 / np.sqrt(values.size)
            np.testing.assert_allclose(values.std(), bound / np.sqrt(3), rtol=rtol)
            np.testing.assert_allclose(values.std(), torch_values.std(), rtol=2 * rtol)
            assert abs(values.mean()) < 4 * bound / np.sqrt(3 * values.size)


def test_bad_codebook_sizes_name_both_numbers():
    with pytest.raises(ValueError, match=r"codebook_size=1000 is not a perfect square"):
        _bridge("L/4", 1000, 8)
    with pytest.raises(ValueError, match=r"codebook side 36 \(codebook_size=1296\) is not divisible by the bridge patch size 8"):
        _bridge("L/8", 1296, 8)
    with pytest.raises(ValueError, match=r"unknown projector 'L/3'"):
        vqbridge.check_projector("L/3", 1024)


def _pre_change_bridge(bridge, e):
    """The bridge forward pass as it was before the memory options (chunks, bf16) existed:
    one conv patch embed, plain attention, one head call and one unpatchify."""
    s, p, d = bridge.side, bridge.patch, bridge.code_dim
    n = s // p
    x = bridge.patch_embed(e.reshape(1, s, s, d)).reshape(1, n * n, -1)
    for block in bridge.blocks:
        b, t, width = x.shape
        qkv = block.qkv(vqbridge.plain_layer_norm(x)).reshape(b, t, 3, block.num_heads, width // block.num_heads)
        attended = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        x = x + block.proj(attended.reshape(b, t, width))
        x = x + block.fc2(jax.nn.gelu(block.fc1(vqbridge.plain_layer_norm(x)), approximate=True))
    x = bridge.head(vqbridge.plain_layer_norm(x))
    return x.reshape(n, n, p, p, d).transpose(0, 2, 1, 3, 4).reshape(s * s, d)


def _value_and_grads(forward, bridge, e, w):
    """Jitted (output, d/dE, d/dparams) of sum(w * forward(bridge, e))."""
    graph, params = nnx.split(bridge, nnx.Param)

    def loss(params, e):
        out = forward(nnx.merge(graph, params), e)
        return jnp.sum(w * out.astype(jnp.float32)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, e)
    return out, grads[1], grads[0]


def _bridge_and_inputs(name, k, d, **kw):
    bridge = vqbridge.make_projector(name, k, d, rngs=nnx.Rngs(0), **kw)
    _randomize(bridge)
    rng = np.random.default_rng(0)
    return bridge, jnp.asarray(rng.normal(size=(k, d)), jnp.float32), jnp.asarray(rng.normal(size=(k, d)), jnp.float32)


@pytest.mark.parametrize("name,k,d", [("S/4", 1024, 8), ("L/8", 4096, 16)])
def test_default_bridge_is_bit_identical_to_the_pre_change_program(name, k, d):
    bridge, e, w = _bridge_and_inputs(name, k, d)
    out, ge, gp = _value_and_grads(lambda m, e: m(e), bridge, e, w)
    ref_out, ref_ge, ref_gp = _value_and_grads(_pre_change_bridge, bridge, e, w)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
    np.testing.assert_array_equal(np.asarray(ge), np.asarray(ref_ge))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), gp, ref_gp)


@pytest.mark.parametrize("chunks", [2, 8])
def test_chunked_bridge_equals_the_whole_one(chunks):
    """S/4 at K = 1024: 8 patch rows of 8 tokens; bands of 8 / chunks patch rows."""
    bridge, e, w = _bridge_and_inputs("S/4", 1024, 8)
    chunked = vqbridge.make_projector("S/4", 1024, 8, bridge_chunks=chunks, rngs=nnx.Rngs(0))
    nnx.update(chunked, nnx.state(bridge, nnx.Param))
    out, ge, gp = _value_and_grads(lambda m, e: m(e), bridge, e, w)
    c_out, c_ge, c_gp = _value_and_grads(lambda m, e: m(e), chunked, e, w)
    np.testing.assert_allclose(np.asarray(c_out), np.asarray(out), rtol=1e-5, atol=1e-5 * float(jnp.abs(out).max()))
    np.testing.assert_allclose(np.asarray(c_ge), np.asarray(ge), rtol=1e-4, atol=1e-5 * float(jnp.abs(ge).max()))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                                         atol=1e-5 * float(jnp.abs(b).max())), c_gp, gp)


def test_chunked_attention_equals_plain_attention():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 12, 4, 8))
    want = jax.nn.dot_product_attention(q, k, v)
    np.testing.assert_allclose(np.asarray(vqbridge.chunked_attention(q, k, v, 3)), np.asarray(want), rtol=1e-6,
                               atol=1e-6)


def test_bf16_bridge_keeps_float32_parameters_and_gradients():
    bridge, e, w = _bridge_and_inputs("S/4", 1024, 8, dtype=jnp.bfloat16, bridge_chunks=2)
    reference = vqbridge.make_projector("S/4", 1024, 8, rngs=nnx.Rngs(0))
    nnx.update(reference, nnx.state(bridge, nnx.Param))
    out, ge, gp = _value_and_grads(lambda m, e: m(e), bridge, e, w)
    ref_out, ref_ge, _ = _value_and_grads(lambda m, e: m(e), reference, e, w)
    assert out.dtype == jnp.bfloat16 and ge.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bridge, nnx.Param)))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(gp))
    scale = float(jnp.abs(ref_out).max())
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out), atol=0.05 * scale)
    assert float(jnp.linalg.norm(ge - ref_ge) / jnp.linalg.norm(ref_ge)) < 0.05


def test_bad_bridge_chunks_name_the_patch_rows():
    with pytest.raises(ValueError, match=r"bridge chunks=3 must be a positive divisor of the 8 patch rows"):
        vqbridge.make_projector("S/4", 1024, 8, bridge_chunks=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"applies to VQBridge projectors only"):
        vqbridge.check_projector("lin/1", 1024, bridge_chunks=2)

"""The GPT: preset sizes, parameter names and init, RMSNorm and 2-D rotary against numpy, causality,
the KV-cache decode against the full forward, dropout, remat and bf16."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fvq_jax import sharding
from fvq_jax.models import gpt
from tests.models.tiny_gpt import TINY, forward, param_arrays, random_gpt

PAPER = {"GPT-B": (2048, 111e6), "GPT-L": (2816, 343e6), "GPT-XL": (3584, 775e6), "GPT-XXL": (4096, 1.4e9),
         "GPT-3B": (8704, 3.1e9)}


@pytest.mark.parametrize("preset", list(PAPER))
def test_paper_presets_ffn_width_and_parameter_count(preset):
    ffn, count = PAPER[preset]
    config = gpt.gpt_config(preset, vocab_size=16384, num_classes=1000, grid=16)
    assert config.ffn_dim == ffn
    model = nnx.eval_shape(lambda: gpt.GPT(config, rngs=nnx.Rngs(0)))  # abstract: nothing allocated
    counted = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert counted == gpt.num_params(config)
    assert abs(counted - count) / count < 0.01, counted  # the paper rounds to 3 significant digits


def test_small_presets():
    tiny = gpt.gpt_config("GPT-tiny", vocab_size=256, num_classes=10, grid=4)
    assert (tiny.dim, tiny.n_layer, tiny.n_head, tiny.head_dim, tiny.ffn_dim) == (64, 2, 4, 16, 256)
    small = gpt.gpt_config("GPT-S", vocab_size=1024, num_classes=10, grid=8)
    assert (small.dim, small.n_layer, small.n_head, small.head_dim, small.ffn_dim) == (256, 6, 8, 32, 768)
    assert gpt.find_multiple(682, 256) == 768 and gpt.find_multiple(512, 256) == 512


def test_config_errors():
    with pytest.raises(ValueError, match="not divisible by n_head"):
        dataclasses.replace(TINY, n_head=3)
    with pytest.raises(ValueError, match="multiple of 4"):
        dataclasses.replace(TINY, dim=24, n_head=4)  # head_dim 6
    with pytest.raises(ValueError, match="unknown GPT preset"):
        gpt.gpt_config("GPT-Q", vocab_size=8, num_classes=1, grid=2)


def test_parameter_names_logical_axes_and_sharding():
    model = nnx.eval_shape(lambda: gpt.GPT(TINY, rngs=nnx.Rngs(0)))
    names = {".".join(map(str, path)): (v.shape, sharding.logical_axes_of(v))
             for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    d, f, h, hd, k = TINY.dim, TINY.ffn_dim, TINY.n_head, TINY.head_dim, TINY.vocab_size
    expected = {
        "tok_embeddings.embedding": ((k, d), ("vocab", "embed")),
        "cls_embedding.embedding": ((TINY.num_classes + 1, d), ("classes", "embed")),
        "norm.scale": ((d,), ("norm",)),
        "output.kernel": ((d, k), ("embed", "vocab")),
    }
    for i in range(TINY.n_layer):
        expected.update({
            f"layers.{i}.attention_norm.scale": ((d,), ("norm",)),
            f"layers.{i}.attention.wqkv.kernel": ((d, 3, h, hd), ("embed", "qkv", "heads", "head_dim")),
            f"layers.{i}.attention.wo.kernel": ((h, hd, d), ("heads", "head_dim", "embed")),
            f"layers.{i}.ffn_norm.scale": ((d,), ("norm",)),
            f"layers.{i}.feed_forward.w1.kernel": ((d, f), ("embed", "mlp")),
            f"layers.{i}.feed_forward.w3.kernel": ((d, f), ("embed", "mlp")),
            f"layers.{i}.feed_forward.w2.kernel": ((f, d), ("mlp", "embed")),
        })
    assert names == expected
    # Every name has a rule; on a (data 1, fsdp 2, tensor 2) mesh heads and K go to tensor, embed to fsdp.
    ruled = dict(sharding.DEFAULT_RULES)
    assert all(a in ruled for _, axes in names.values() for a in axes)
    mesh = jax.sharding.AbstractMesh((1, 2, 2), sharding.MESH_AXES)
    spec = sharding.logical_to_spec(names["layers.0.attention.wqkv.kernel"][1], (d, 3, h, hd), mesh,
                                    sharding.DEFAULT_RULES)
    assert spec == jax.sharding.PartitionSpec("fsdp", None, "tensor", None)


def test_init():
    params = param_arrays(gpt.GPT(gpt.gpt_config("GPT-tiny", vocab_size=256, num_classes=10, grid=4),
                                  rngs=nnx.Rngs(0)))
    assert not params["output/kernel"].any()  # zero output layer: uniform logits at step 0
    for name, value in params.items():
        assert value.dtype == np.float32, name
        if name.endswith("scale"):
            np.testing.assert_array_equal(value, 1.0)
        elif name != "output/kernel" and value.size >= 8192:
            assert abs(value.mean()) < 0.002 and abs(value.std() - 0.02) < 0.001, (name, value.std())


def test_rms_norm_matches_numpy():
    x = np.random.default_rng(0).normal(size=(2, 5, 32)).astype(np.float32) * 3
    norm = gpt.RMSNorm(32, eps=1e-5, dtype=jnp.bfloat16)
    norm.scale[...] = jnp.linspace(0.5, 1.5, 32)
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * np.linspace(0.5, 1.5, 32)
    got = norm(jnp.asarray(x))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2)
    norm.dtype = jnp.float32
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def _numpy_rope(x, grid, base=10000.0):
    """LlamaGen's complex formulation: pair (2m, 2m+1) is a complex number times exp(i angle)."""
    b, t, h, hd = x.shape
    out = np.zeros_like(x, np.float64)
    for p in range(1, t):  # position 0 (class token) -> zeros
        r, c = divmod(p - 1, grid)
        freqs = [1.0 / base ** (2 * j / (hd // 2)) for j in range(hd // 4)]
        angles = np.array([r * f for f in freqs] + [c * f for f in freqs])
        z = x[:, p, :, 0::2] + 1j * x[:, p, :, 1::2]
        z = z * np.exp(1j * angles)
        out[:, p, :, 0::2], out[:, p, :, 1::2] = z.real, z.imag
    return out


def test_2d_rope_matches_numpy():
    grid, hd = 4, 16
    x = np.random.default_rng(1).normal(size=(2, grid * grid, 3, hd)).astype(np.float32)
    cos, sin = gpt.rope_table(grid, hd)
    assert cos.shape == (grid * grid, hd // 2) and not cos[0].any() and not sin[0].any()
    got = np.asarray(gpt.apply_rope(jnp.asarray(x), jnp.asarray(cos), jnp.asarray(sin)))
    np.testing.assert_allclose(got, _numpy_rope(x, grid), rtol=1e-5, atol=1e-5)
    assert not got[:, 0].any()  # the class token's q and k vanish
    # Rows first: code 1 is (0, 1), so only the column half of its angles is non-zero.
    assert not sin[2, : hd // 4].any() and sin[2, hd // 4:].any()


def _tokens(config, batch, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (batch, config.seq_len - 1))
    labels = rng.integers(0, config.num_classes + 1, (batch,))
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(labels, jnp.int32)


def test_causal():
    model = random_gpt()
    tokens, labels = _tokens(TINY, 2, 0)
    base = np.asarray(forward(model, tokens, labels))
    t = 6  # logits at positions <= t see tokens[:, :t] only
    changed = tokens.at[:, t:].set((tokens[:, t:] + 1) % TINY.vocab_size)
    after = np.asarray(forward(model, changed, labels))
    np.testing.assert_allclose(after[:, : t + 1], base[:, : t + 1], rtol=1e-6, atol=1e-6)
    assert np.abs(after[:, t + 1:] - base[:, t + 1:]).max() > 1e-2
    # A shorter prefix gives the same logits as the full sequence at its positions.
    prefix = np.asarray(forward(model, tokens[:, :t], labels))
    np.testing.assert_allclose(prefix, base[:, : t + 1], rtol=1e-5, atol=1e-5)


def test_call_is_hidden_states_then_logits():
    model = random_gpt()
    tokens, labels = _tokens(TINY, 2, 1)
    hidden = forward(model, tokens, labels, method="hidden_states")
    assert hidden.shape == (2, TINY.seq_len, TINY.dim)
    logits = forward(model, tokens, labels)
    assert logits.shape == (2, TINY.seq_len, TINY.vocab_size) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), np.asarray(hidden) @ param_arrays(model)["output/kernel"],
                               rtol=1e-5, atol=1e-5)


def test_kv_cache_decode_matches_the_full_forward():
    model = random_gpt()
    tokens, labels = _tokens(TINY, 3, 2)
    full = np.asarray(forward(model, tokens, labels))
    step = jax.jit(lambda ids, t, cache: model.decode(ids, t, cache))
    cache = model.init_cache(3)
    assert cache["k"].shape == (TINY.n_layer, 3, TINY.seq_len, TINY.n_head, TINY.head_dim)
    for t in range(TINY.seq_len):
        logits, cache = step(labels if t == 0 else tokens[:, t - 1], jnp.int32(t), cache)
        np.testing.assert_allclose(np.asarray(logits), full[:, t], rtol=1e-5, atol=1e-5, err_msg=f"position {t}")
    assert np.asarray(cache["k"]).any(axis=(0, 1, 3, 4))[1:].all()  # every position written (0: zero key)


def test_dropout_function():
    x = jnp.ones((200, 100))
    y = np.asarray(gpt.dropout(x, 0.25, jax.random.key(0)))
    np.testing.assert_array_equal(np.unique(y), np.float32([0.0, 1 / 0.75]))
    assert abs((y == 0).mean() - 0.25) < 0.01
    assert gpt.dropout(x, 0.25, None) is x and gpt.dropout(x, 0.0, jax.random.key(0)) is x


def test_train_dropout_is_keyed_and_eval_is_deterministic():
    model = random_gpt()
    tokens, labels = _tokens(TINY, 2, 3)
    key = jax.random.key(7)
    plain = np.asarray(forward(model, tokens, labels))
    np.testing.assert_array_equal(np.asarray(forward(model, tokens, labels, dropout_key=key)), plain)  # train=False
    a = np.asarray(forward(model, tokens, labels, train=True, dropout_key=key))
    np.testing.assert_array_equal(np.asarray(forward(model, tokens, labels, train=True, dropout_key=key)), a)
    b = np.asarray(forward(model, tokens, labels, train=True, dropout_key=jax.random.key(8)))
    assert np.abs(a - plain).max() > 1e-3 and np.abs(a - b).max() > 1e-3
    with pytest.raises(ValueError, match="dropout_key"):
        model(tokens, labels, train=True)
    no_dropout = random_gpt(dataclasses.replace(TINY, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0,
                                                class_dropout=0.0))
    np.testing.assert_array_equal(np.asarray(forward(no_dropout, tokens, labels, train=True)),
                                  np.asarray(forward(no_dropout, tokens, labels)))


def test_class_dropout_swaps_in_the_null_class():
    config = dataclasses.replace(TINY, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, class_dropout=0.5)
    model = random_gpt(config)
    tokens, labels = _tokens(config, 32, 4)
    labels = labels % config.num_classes
    dropped = np.asarray(forward(model, tokens, labels, train=True, dropout_key=jax.random.key(0)))
    cond = np.asarray(forward(model, tokens, labels))
    null = np.asarray(forward(model, tokens, jnp.full_like(labels, config.null_class)))
    is_cond = np.isclose(dropped, cond, rtol=1e-5, atol=1e-5).all(axis=(1, 2))
    is_null = np.isclose(dropped, null, rtol=1e-5, atol=1e-5).all(axis=(1, 2))
    assert (is_cond ^ is_null).all() and 4 < is_null.sum() < 28


def _loss_and_grads(model, tokens, labels):
    graphdef, params = nnx.split(model)

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens, labels, train=True, dropout_key=jax.random.key(3))
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens_full[..., None], -1)[..., 0])

    tokens_full = jnp.concatenate([tokens, tokens[:, :1]], axis=1)
    return jax.jit(jax.value_and_grad(loss))(params)


def _rematerialised_calls(model, tokens, labels) -> int:
    graphdef, params = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p).hidden_states(tokens, labels))(params)
    return sum(e.primitive.name in ("remat2", "checkpoint") for e in jaxpr.jaxpr.eqns)


def test_remat_gives_the_same_loss_and_gradients():
    tokens, labels = _tokens(TINY, 2, 5)
    plain_model, remat_model = random_gpt(), random_gpt(dataclasses.replace(TINY, remat=True))
    assert _rematerialised_calls(plain_model, tokens, labels) == 0
    assert _rematerialised_calls(remat_model, tokens, labels) == TINY.n_layer  # one checkpoint per block
    plain = _loss_and_grads(plain_model, tokens, labels)
    remat = _loss_and_grads(remat_model, tokens, labels)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert all(np.asarray(g).any() for g in jax.tree.leaves(plain[1]))  # every parameter gets a gradient


def test_bf16_compute_is_close_to_fp32():
    tokens, labels = _tokens(TINY, 2, 6)
    fp32 = np.asarray(forward(random_gpt(), tokens, labels))
    model = random_gpt(dtype=jnp.bfloat16)
    logits = forward(model, tokens, labels)
    assert logits.dtype == jnp.float32 and forward(model, tokens, labels, method="hidden_states").dtype == jnp.bfloat16
    assert all(v.dtype == np.float32 for v in param_arrays(model).values())
    assert model.init_cache(2)["k"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(logits), fp32, atol=0.05 * np.abs(fp32).max())


def test_sharded_forward_gradient_and_sampling_match_one_device(python_runner):
    """8 simulated devices (data 2, fsdp 2, tensor 2): parameters laid out by their logical axes, activations
    pinned by `constrain`; the loss, its gradients and the sampled tokens are those of one device."""
    out = python_runner("""
        import dataclasses, json, jax, jax.numpy as jnp, ml_collections, numpy as np
        from flax import nnx
        from fvq_jax import sharding
        from fvq_jax.losses_gpt import chunked_cross_entropy
        from fvq_jax.sampling import sampler
        from tests.models.tiny_gpt import TINY, random_gpt

        model = random_gpt(dataclasses.replace(TINY, remat=True), seed=2)
        graphdef, params = nnx.split(model)
        rng = np.random.default_rng(0)
        tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (8, TINY.seq_len)), jnp.int32)
        labels = jnp.asarray(rng.integers(0, TINY.num_classes, (8,)), jnp.int32)

        def loss(params, tokens, labels):
            m = nnx.merge(graphdef, params)
            hidden = m.hidden_states(tokens[:, :-1], labels, train=True, dropout_key=jax.random.key(0))
            return chunked_cross_entropy(hidden, m.output.kernel[...], tokens, chunk_size=24)[0]

        step = jax.jit(jax.value_and_grad(loss))
        config = sampler.SamplingConfig(top_k=8, top_p=0.9, cfg_scale=2.0)
        keys = sampler.sample_keys(0, 0, 8)
        want_loss, want_grads = step(params, tokens, labels)
        want_tokens = sampler.sample_tokens(model, labels, keys, config)

        mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
        shardings = sharding.state_shardings(params, mesh)
        with jax.set_mesh(mesh), sharding.axis_rules(sharding.DEFAULT_RULES):
            sharded = jax.device_put(params, shardings)
            batch = sharding.data_sharding(mesh)
            tokens_s, labels_s = jax.device_put(tokens, batch), jax.device_put(labels, batch)
            got_loss, got_grads = step(sharded, tokens_s, labels_s)
            got_tokens = sampler.sample_tokens(nnx.merge(graphdef, sharded), labels_s, keys, config)
        wqkv = sharded["layers"][0]["attention"]["wqkv"]["kernel"]
        err = max(float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-12))
                  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)))
        print(json.dumps({"loss": [float(got_loss), float(want_loss)], "grad_err": err,
                          "tokens_equal": bool((got_tokens == want_tokens).all()),
                          "wqkv": str(wqkv.sharding.spec)}))
    """, num_devices=8)
    got = json.loads(out.strip().splitlines()[-1])
    assert got["wqkv"] == str(jax.sharding.PartitionSpec("fsdp", None, "tensor", None))
    assert got["loss"][0] == pytest.approx(got["loss"][1], rel=1e-5)
    assert got["grad_err"] < 1e-4
    assert got["tokens_equal"]

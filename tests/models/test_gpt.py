"""The GPT: the config spec, preset sizes, parameter names and init, RMSNorm and 2-D rotary against numpy,
causality, the KV-cache decode against the full forward, dropout, remat policies, bf16, and the scanned
layers against the looped ones."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fvq_jax import config_lib, sharding
from fvq_jax.models import gpt
from fvq_jax.sampling import sampler
from fvq_jax.train import resume
from tests.models.tiny_gpt import TINY, forward, param_arrays, random_gpt

SCANNED = dataclasses.replace(TINY, scan_layers=True)
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]

PAPER = {"GPT-B": (2048, 111e6), "GPT-L": (2816, 343e6), "GPT-XL": (3584, 775e6), "GPT-XXL": (4096, 1.4e9),
         "GPT-3B": (8704, 3.1e9)}


@pytest.mark.parametrize("preset", list(PAPER))
def test_paper_presets_ffn_width_and_parameter_count(preset):
    ffn, count = PAPER[preset]
    config = gpt.GPTConfig(preset=preset, vocab_size=16384, num_classes=1000, grid=16)
    assert config.ffn_dim == ffn
    for scan_layers in (False, True):
        model = nnx.eval_shape(lambda: gpt.GPT(dataclasses.replace(config, scan_layers=scan_layers),
                                               rngs=nnx.Rngs(0)))  # abstract: nothing allocated
        counted = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert counted == gpt.num_params(config)
    assert abs(counted - count) / count < 0.01, counted  # the paper rounds to 3 significant digits


def test_small_presets():
    tiny = gpt.GPTConfig(preset="GPT-tiny", vocab_size=256, num_classes=10, grid=4)
    assert (tiny.dim, tiny.n_layer, tiny.n_head, tiny.head_dim, tiny.ffn_dim) == (64, 2, 4, 16, 256)
    small = gpt.GPTConfig(preset="GPT-S", vocab_size=1024, num_classes=10, grid=8)
    assert (small.dim, small.n_layer, small.n_head, small.head_dim, small.ffn_dim) == (256, 6, 8, 32, 768)
    assert gpt.find_multiple(682, 256) == 768 and gpt.find_multiple(512, 256) == 512
    # Explicit sizes replace the preset's.
    wide = gpt.GPTConfig(preset="GPT-S", dim=512, vocab_size=1024, num_classes=10, grid=8)
    assert (wide.dim, wide.n_layer, wide.n_head, wide.ffn_dim) == (512, 6, 8, 1536)


BLOCK = dict(preset="GPT-tiny", vocab_size=64, num_classes=5, grid=4)


@pytest.mark.parametrize("change, message", [
    (dict(preset="GPT-Q"), "model.preset: 'GPT-Q' is not one of"),
    (dict(preset="custom"), "model.dim: must be an int > 0.0, got None"),
    (dict(n_head=3), "model.n_head: GPT dim 64 is not divisible by n_head 3"),
    (dict(dim=24), "model.n_head: GPT head_dim 6 .* must be a multiple of 4"),
    (dict(vocab_size=None), "model.vocab_size: must be an int > 0.0, got None"),
    (dict(ffn_dim=0), "model.ffn_dim: must be an int > 0.0, got 0"),
    (dict(resid_dropout=1.0), r"model.resid_dropout: must lie in \[0, 1\), got 1.0"),
    (dict(norm_eps=-1.0), "model.norm_eps: must be a number > 0.0"),
    (dict(remat="some"), r"model.remat: 'some' is not one of \['none', 'full', 'dots_saveable'\]"),
    (dict(scan_layers="yes"), "model.scan_layers: must be true or false, got 'yes'"),
])
def test_config_errors_name_the_field(change, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        gpt.GPTConfig.from_config({**BLOCK, **change}, "model")


def test_config_blocks_old_and_new():
    # A block saved before scanned layers and remat policies (remat true / false, no scan_layers): looped layers.
    old = {**BLOCK, "remat": True}
    assert gpt.upgraded_block(old) == {**BLOCK, "remat": "full", "scan_layers": False}
    assert gpt.GPTConfig.from_config({**BLOCK, "remat": False}, "model") == gpt.GPTConfig(**BLOCK)
    assert gpt.GPTConfig.from_config(old, "model") == gpt.GPTConfig(**BLOCK, remat="full")
    # configs/gpt.py writes its model block from GPTConfig's defaults: filled in, it is the default spec.
    configs = config_lib.load_file(ROOT / "configs" / "gpt.py")
    codes = dict(vocab_size=64, num_classes=5, grid=4)
    for arg, want in (("paper", gpt.GPTConfig(preset="GPT-L", scan_layers=True, **codes)),
                      ("", gpt.GPTConfig(preset="GPT-S", **codes))):
        block = configs.get_config(arg).model
        block.update(codes)
        assert gpt.GPTConfig.from_config(block, "model") == want
    with pytest.raises(ValueError, match=r"not GPTConfig fields: \['depth'\]"):
        gpt.model_block(depth=3)
    # A run saved before resumes: its old block is no change, a different remat is.
    config = configs.get_config("")
    saved = resume.config_json(config)
    saved["model"] = {**{k: v for k, v in saved["model"].items() if k != "scan_layers"}, "remat": False}
    resume.check_resume_config(saved, config, 100)
    saved["model"]["remat"] = True
    with pytest.raises(resume.ConfigChanged, match="model.remat: 'full' -> 'none'"):
        resume.check_resume_config(saved, config, 100)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_parameter_names_logical_axes_and_sharding(scan_layers):
    config = dataclasses.replace(TINY, scan_layers=scan_layers)
    model = nnx.eval_shape(lambda: gpt.GPT(config, rngs=nnx.Rngs(0)))
    names = {".".join(map(str, path)): (v.shape, sharding.logical_axes_of(v))
             for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    d, f, h, hd, k = TINY.dim, TINY.ffn_dim, TINY.n_head, TINY.head_dim, TINY.vocab_size
    expected = {
        "tok_embeddings.embedding": ((k, d), ("vocab", "embed")),
        "cls_embedding.embedding": ((TINY.num_classes + 1, d), ("classes", "embed")),
        "norm.scale": ((d,), ("norm",)),
        "output.kernel": ((d, k), ("embed", "vocab")),
    }
    block = {
        "attention_norm.scale": ((d,), ("norm",)),
        "attention.wqkv.kernel": ((d, 3, h, hd), ("embed", "qkv", "heads", "head_dim")),
        "attention.wo.kernel": ((h, hd, d), ("heads", "head_dim", "embed")),
        "ffn_norm.scale": ((d,), ("norm",)),
        "feed_forward.w1.kernel": ((d, f), ("embed", "mlp")),
        "feed_forward.w3.kernel": ((d, f), ("embed", "mlp")),
        "feed_forward.w2.kernel": ((f, d), ("mlp", "embed")),
    }
    if scan_layers:  # one block, every parameter stacked along a leading "layers" axis
        expected.update({f"layers.{name}": ((TINY.n_layer,) + shape, ("layers",) + axes)
                         for name, (shape, axes) in block.items()})
    else:
        expected.update({f"layers.{i}.{name}": value for i in range(TINY.n_layer) for name, value in block.items()})
    assert names == expected
    # Every name has a rule; on a (data 1, fsdp 2, tensor 2) mesh heads and K go to tensor, embed to fsdp, the
    # stacked layers to no axis.
    ruled = dict(sharding.DEFAULT_RULES)
    assert all(a in ruled for _, axes in names.values() for a in axes)
    mesh = jax.sharding.AbstractMesh((1, 2, 2), sharding.MESH_AXES)
    wqkv = "layers.attention.wqkv.kernel" if scan_layers else "layers.0.attention.wqkv.kernel"
    spec = sharding.logical_to_spec(names[wqkv][1], names[wqkv][0], mesh, sharding.DEFAULT_RULES)
    want = ("fsdp", None, "tensor", None)
    assert spec == jax.sharding.PartitionSpec(*((None,) + want if scan_layers else want))


def test_init():
    config = gpt.GPTConfig(preset="GPT-tiny", vocab_size=256, num_classes=10, grid=4)
    params = param_arrays(gpt.GPT(config, rngs=nnx.Rngs(0)))
    assert not params["output/kernel"].any()  # zero output layer: uniform logits at step 0
    for name, value in params.items():
        assert value.dtype == np.float32, name
        if name.endswith("scale"):
            np.testing.assert_array_equal(value, 1.0)
        elif name != "output/kernel" and value.size >= 8192:
            assert abs(value.mean()) < 0.002 and abs(value.std() - 0.02) < 0.001, (name, value.std())
    # The scanned GPT starts from the same weights, stacked.
    looped = nnx.to_pure_dict(nnx.state(gpt.GPT(config, rngs=nnx.Rngs(0)), nnx.Param))
    scanned = gpt.GPT(dataclasses.replace(config, scan_layers=True), rngs=nnx.Rngs(0))
    for a, b in zip(jax.tree.leaves(gpt.stack_layers(looped)), jax.tree.leaves(nnx.state(scanned, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stack_and_unstack_layers_are_inverse():
    rng = np.random.default_rng(0)
    looped = {"layers": {i: {"w": {"kernel": rng.normal(size=(3, 4))}, "scale": rng.normal(size=(4,))}
                         for i in range(3)},
              "norm": {"scale": rng.normal(size=(4,))}}
    stacked = gpt.stack_layers(looped)
    assert stacked["layers"]["w"]["kernel"].shape == (3, 3, 4) and isinstance(stacked["layers"]["scale"], np.ndarray)
    np.testing.assert_array_equal(stacked["layers"]["w"]["kernel"][2], looped["layers"][2]["w"]["kernel"])
    assert stacked["norm"] is looped["norm"]
    back = gpt.unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(looped)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(looped)):
        np.testing.assert_array_equal(a, b)
    # jax arrays stay jax arrays, abstract ones abstract.
    assert isinstance(gpt.stack_layers(jax.tree.map(jnp.asarray, looped))["layers"]["scale"], jax.Array)
    shapes = jax.eval_shape(gpt.unstack_layers, stacked)
    assert shapes["layers"][1]["w"]["kernel"].shape == (3, 4)


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
    assert [x.shape for x in cache["k"] + cache["v"]] == [(3, TINY.n_head, TINY.seq_len, TINY.head_dim)] * 4
    for t in range(TINY.seq_len):
        logits, cache = step(labels if t == 0 else tokens[:, t - 1], jnp.int32(t), cache)
        np.testing.assert_allclose(np.asarray(logits), full[:, t], rtol=1e-5, atol=1e-5, err_msg=f"position {t}")
    assert np.asarray(cache["k"]).any(axis=(0, 1, 2, 4))[1:].all()  # every position written (0: zero key)


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


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations (scan bodies, remat bodies)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (tuple, list)) else (param,)):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    yield from _equations(inner)


def _jaxpr(model, method, *args):
    graphdef, params = nnx.split(model)
    return jax.make_jaxpr(lambda p: getattr(nnx.merge(graphdef, p), method)(*args))(params).jaxpr


def _grads_close(got, want, rtol=1e-5, atol=1e-6):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_remat_policies_give_the_same_loss_and_gradients(scan_layers):
    tokens, labels = _tokens(TINY, 2, 5)
    config = dataclasses.replace(TINY, scan_layers=scan_layers)
    plain = _loss_and_grads(random_gpt(config), tokens, labels)
    assert all(np.asarray(g).any() for g in jax.tree.leaves(plain[1]))  # every parameter gets a gradient
    for policy in ("none", "full", "dots_saveable"):
        model = random_gpt(dataclasses.replace(config, remat=policy))
        remats = [e for e in _equations(_jaxpr(model, "hidden_states", tokens, labels))
                  if e.primitive.name in ("remat2", "checkpoint")]
        # One checkpoint per block in the loop; one around the block inside the scan.
        assert len(remats) == (0 if policy == "none" else 1 if scan_layers else TINY.n_layer), policy
        assert all(e.params["policy"] is gpt.REMAT_POLICIES[policy] for e in remats)
        _grads_close(_loss_and_grads(model, tokens, labels), plain)


def test_scanned_layers_compute_what_the_looped_ones_do():
    """One scan over the stacked block: the logits (evaluation and training, dropout included), the loss and
    every gradient of the looped GPT holding the same weights."""
    looped, scanned = random_gpt(TINY), random_gpt(SCANNED)
    tokens, labels = _tokens(TINY, 3, 8)
    key = jax.random.key(4)
    for train in (False, True):
        np.testing.assert_allclose(np.asarray(forward(scanned, tokens, labels, train=train, dropout_key=key)),
                                   np.asarray(forward(looped, tokens, labels, train=train, dropout_key=key)),
                                   rtol=1e-6, atol=1e-6)
    loss, grads = _loss_and_grads(scanned, tokens[:2], labels[:2])
    want_loss, want_grads = _loss_and_grads(looped, tokens[:2], labels[:2])
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
    _grads_close(gpt.unstack_layers(nnx.to_pure_dict(grads)), nnx.to_pure_dict(want_grads), rtol=1e-6)
    # The blocks compile once: a scan of n_layer steps around one block, no Python copy per layer.
    scans = [e for e in _jaxpr(scanned, "hidden_states", tokens, labels).eqns if e.primitive.name == "scan"]
    assert [e.params["length"] for e in scans] == [TINY.n_layer]
    assert not [e for e in _jaxpr(looped, "hidden_states", tokens, labels).eqns if e.primitive.name == "scan"]


def test_scanned_decode_is_the_looped_decode_and_reads_each_cache_in_place():
    """A scanned GPT decodes as its looped() self: the looped GPT's logits bit for bit (and the full forward's).
    No decode step slices, transposes or stacks a layer's cache [B, H, N, hd] (on the CPU each would be a copy of
    it): each layer writes one slot of its k and of its v (dynamic_update_slice) and attends to the arrays as they
    lie. In the sampler's loop over positions no stacked [n_layer, ...] weight is read: looped() slices them once,
    before the loop."""
    looped, scanned = random_gpt(TINY), random_gpt(SCANNED)
    tokens, labels = _tokens(TINY, 3, 9)
    full = np.asarray(forward(looped, tokens, labels))
    step = jax.jit(lambda graph, params, ids, t, cache: nnx.merge(graph, params).decode(ids, t, cache),
                   static_argnums=0)
    caches = {"looped": looped.init_cache(3), "scanned": scanned.init_cache(3)}
    for t in range(TINY.seq_len):
        ids = labels if t == 0 else tokens[:, t - 1]
        logits = {}
        for name, model in (("looped", looped), ("scanned", scanned)):
            logits[name], caches[name] = step(*nnx.split(model), ids, jnp.int32(t), caches[name])
        np.testing.assert_array_equal(np.asarray(logits["scanned"]), np.asarray(logits["looped"]), f"position {t}")
        np.testing.assert_allclose(np.asarray(logits["scanned"]), full[:, t], rtol=1e-5, atol=1e-5)
    layer = (3, TINY.n_head, TINY.seq_len, TINY.head_dim)
    for model in (looped, scanned):
        body = list(_equations(_jaxpr(model, "decode", labels, jnp.int32(0), model.init_cache(3))))
        assert not [e for e in body if e.primitive.name == "scan"]
        writes = [e for e in body if e.primitive.name == "dynamic_update_slice" and e.outvars[0].aval.shape == layer]
        assert len(writes) == 2 * TINY.n_layer
        reads = [e.primitive.name for e in body if any(getattr(v, "aval", None) is not None
                                                       and v.aval.shape == layer for v in e.invars)]
        assert sorted(set(reads)) == ["dot_general", "dynamic_update_slice"], reads
    # The sampler's loop over a traced range of positions (the server's) reads no stacked weight in its body.
    stacked = {v.shape for v in jax.tree.leaves(nnx.state(scanned.layers, nnx.Param))}
    graph, params = nnx.split(scanned)
    start, advance = sampler.decoding_fns(graph, guided=True)
    rows = (labels, sampler.sample_keys(0, 0, 3), sampler.SamplingConfig(cfg_scale=2.0).rows(3))
    jaxpr = jax.make_jaxpr(lambda p, first, stop: advance(p, start(p, labels), *rows, first, stop))(
        params, 0, TINY.seq_len).jaxpr
    (loop,) = [e for e in jaxpr.eqns if e.primitive.name == "while"]
    inside = {v.aval.shape for e in _equations(loop.params["body_jaxpr"].jaxpr) for v in e.invars
              if getattr(v, "aval", None) is not None}
    assert stacked and not stacked & inside


def test_bf16_compute_is_close_to_fp32():
    tokens, labels = _tokens(TINY, 2, 6)
    fp32 = np.asarray(forward(random_gpt(), tokens, labels))
    model = random_gpt(dtype=jnp.bfloat16)
    logits = forward(model, tokens, labels)
    assert logits.dtype == jnp.float32 and forward(model, tokens, labels, method="hidden_states").dtype == jnp.bfloat16
    assert all(v.dtype == np.float32 for v in param_arrays(model).values())
    assert {x.dtype for x in model.init_cache(2)["k"]} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_allclose(np.asarray(logits), fp32, atol=0.05 * np.abs(fp32).max())


def test_sharded_forward_gradient_and_sampling_match_one_device(python_runner):
    """8 simulated devices (data 2, fsdp 2, tensor 2): parameters laid out by their logical axes, activations
    pinned by `constrain`; the loss, its gradients and the sampled tokens are those of one device, for the
    looped layers (remat full) and the scanned ones (remat dots_saveable; the stacked axis unsplit)."""
    out = python_runner("""
        import dataclasses, json, jax, jax.numpy as jnp, ml_collections, numpy as np
        from flax import nnx
        from fvq_jax import sharding
        from fvq_jax.losses_gpt import chunked_cross_entropy
        from fvq_jax.sampling import sampler
        from tests.models.tiny_gpt import TINY, random_gpt

        mesh = sharding.make_mesh(sharding.MeshSpec.from_config(dict(data=2, fsdp=2, tensor=2)))
        rng = np.random.default_rng(0)
        tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (8, TINY.seq_len)), jnp.int32)
        labels = jnp.asarray(rng.integers(0, TINY.num_classes, (8,)), jnp.int32)
        config = sampler.SamplingConfig(top_k=8, top_p=0.9, cfg_scale=2.0)
        keys = sampler.sample_keys(0, 0, 8)
        for remat, scan_layers in (("full", False), ("dots_saveable", True)):
            model = random_gpt(dataclasses.replace(TINY, remat=remat, scan_layers=scan_layers), seed=2)
            graphdef, params = nnx.split(model)

            def loss(params, tokens, labels):
                m = nnx.merge(graphdef, params)
                hidden = m.hidden_states(tokens[:, :-1], labels, train=True, dropout_key=jax.random.key(0))
                return chunked_cross_entropy(hidden, m.output.kernel[...], tokens, chunk_size=24)[0]

            step = jax.jit(jax.value_and_grad(loss))
            want_loss, want_grads = step(params, tokens, labels)
            want_tokens = sampler.sample_tokens(model, labels, keys, config)
            shardings = sharding.state_shardings(params, mesh)
            with jax.set_mesh(mesh), sharding.axis_rules(sharding.DEFAULT_RULES):
                sharded = jax.device_put(params, shardings)
                batch = sharding.data_sharding(mesh)
                tokens_s, labels_s = jax.device_put(tokens, batch), jax.device_put(labels, batch)
                got_loss, got_grads = step(sharded, tokens_s, labels_s)
                got_tokens = sampler.sample_tokens(nnx.merge(graphdef, sharded), labels_s, keys, config)
            layers = sharded["layers"] if scan_layers else sharded["layers"][0]
            err = max(float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-12))
                      for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)))
            print(json.dumps({"scan_layers": scan_layers, "loss": [float(got_loss), float(want_loss)],
                              "grad_err": err, "tokens_equal": bool((got_tokens == want_tokens).all()),
                              "wqkv": str(layers["attention"]["wqkv"]["kernel"].sharding.spec)}))
    """, num_devices=8)
    runs = [json.loads(line) for line in out.strip().splitlines() if line.startswith("{")]
    assert [run["scan_layers"] for run in runs] == [False, True]
    spec = ("fsdp", None, "tensor", None)
    for run in runs:
        want = (None,) + spec if run["scan_layers"] else spec
        assert run["wqkv"] == str(jax.sharding.PartitionSpec(*want))
        assert run["loss"][0] == pytest.approx(run["loss"][1], rel=1e-5)
        assert run["grad_err"] < 1e-4
        assert run["tokens_equal"]


def test_the_optimizer_updates_scanned_parameters_as_looped_ones():
    """AdamW with weight decay on >= 2-D arrays: a stack of norm scales [n_layer, dim] is still a norm scale."""
    from fvq_jax.train.optimizer import make_optimizer

    optim = config_lib.load_file(ROOT / "configs" / "gpt.py").get_config("paper").optim
    optim.update(base_lr=0.1, lr_ref_batch=1)  # large steps: a decayed norm scale would stand out
    tx = make_optimizer(optim, total_steps=10, global_batch=1)
    tokens, labels = _tokens(TINY, 2, 10)
    updated = {}
    for config in (TINY, SCANNED):
        params = nnx.state(random_gpt(config), nnx.Param)
        _, grads = _loss_and_grads(random_gpt(config), tokens, labels)
        updates, _ = tx.update(grads, tx.init(params), params)
        pure = nnx.to_pure_dict(optax.apply_updates(params, updates))
        updated[config.scan_layers] = gpt.unstack_layers(pure) if config.scan_layers else pure
    _grads_close(updated[True], updated[False], rtol=1e-6, atol=1e-7)

"""The quantizer's performance fields in `config.quantizer`: checked up front, built as asked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.quantizers.factory import build_quantizer
from tests.quantizers import tiny_model


@pytest.mark.parametrize("fields,field,message", [
    (dict(search_impl="triton"), "quantizer.search_impl", "is not one of"),
    (dict(bridge_dtype="fp16"), "quantizer.bridge_dtype", "is not one of"),
    (dict(bridge_chunks=3), "quantizer.bridge_chunks", "positive divisor of the 4 patch rows"),
    (dict(bridge_chunks=0), "quantizer.bridge_chunks", "must be an int > 0"),
    (dict(bridge_chunks=2, projector="lin/1"), "quantizer.bridge_chunks", "VQBridge projectors only"),
    (dict(revive="on"), "quantizer.revive", "is not one of"),
    (dict(revive="copy", projector="none"), "quantizer.revive", "VQBridge projector only"),
    (dict(revive="copy", type="residual"), "quantizer.revive", "VQBridge projector only"),
    (dict(revive_every=0), "quantizer.revive_every", "must be an int > 0"),
    (dict(revive_noise=-0.1), "quantizer.revive_noise", "must be a number >= 0"),
    (dict(restart="split"), "quantizer.restart", "is not one of"),
    (dict(restart="pull", type="residual"), "quantizer.restart", "type=vq only"),
    (dict(restart="pull", type="ema", projector="none"), "quantizer.restart", "type=vq only"),
    (dict(restart_weight=0.0), "quantizer.restart_weight", "must be a number > 0"),
])
def test_bad_fields_are_named(fields, field, message):
    with pytest.raises(config_lib.ConfigError, match=message) as info:
        build_quantizer(tiny_model.quantizer_config(**fields), rngs=nnx.Rngs(0))
    assert info.value.field == field


def test_bridge_dtype_and_chunks_reach_the_bridge():
    q = nnx.eval_shape(lambda: build_quantizer(tiny_model.quantizer_config(bridge_dtype="bf16", bridge_chunks=4),
                                               rngs=nnx.Rngs(0)))
    bridge = q.projector
    assert bridge.chunks == 4 and all(block.attention_chunks == 4 for block in bridge.blocks)
    assert bridge.head.dtype == jnp.bfloat16 and bridge.head.kernel.dtype == jnp.float32


@pytest.mark.parametrize("quantizer_type", ["vq", "residual"])
def test_pallas_search_changes_no_value_or_gradient(quantizer_type):
    """The whole quantizer, bridge included, forward and backward: the same with either search
    (D = 16: the smallest the Triton kernel takes)."""
    z = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
    w = jax.random.normal(jax.random.key(1), z.shape)

    def run(impl):
        cfg = tiny_model.quantizer_config(type=quantizer_type, search_impl=impl, code_dim=16)
        q = build_quantizer(cfg, rngs=nnx.Rngs(0))
        graph, params, rest = nnx.split(q, nnx.Param, ...)
        params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)

        def loss(params, z):
            out = nnx.merge(graph, params, rest)(z)
            return out["loss"] + jnp.sum(w * out["z_q"]), out["indices"]

        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, z)

    (loss, idx), grads = run("pallas")
    (ref_loss, ref_idx), ref_grads = run("xla")
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    np.testing.assert_array_equal(np.asarray(loss), np.asarray(ref_loss))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), grads, ref_grads)


@pytest.mark.parametrize("quantizer_type", ["vq", "residual", "multiscale"])
def test_bf16_bridge_trains_every_bridged_type_in_float32(quantizer_type):
    """bf16 activations, float32 parameters, gradients, z_q and losses."""
    cfg = tiny_model.quantizer_config(type=quantizer_type, bridge_dtype="bf16", bridge_chunks=2)
    q = build_quantizer(cfg, rngs=nnx.Rngs(0))
    graph, params, rest = nnx.split(q, nnx.Param, ...)
    z = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))

    def loss(params, z):
        out = nnx.merge(graph, params, rest)(z)
        return out["loss"] + jnp.mean(out["z_q"] ** 2), out

    (value, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, z)
    assert out["z_q"].dtype == jnp.float32 and np.isfinite(float(value))
    assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert q.codebook().dtype == jnp.float32 and q.codebook(None).dtype == jnp.bfloat16

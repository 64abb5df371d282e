"""The fused Pallas nearest-code kernel (interpret mode on the CPU) against the XLA search.

Most inputs lie on a grid of 1/8 steps, so every product and sum is exact in float32, TF32 and
bf16: distances are then bit-identical however a backend orders its sums, ties are real, and
equal indices are a property of the arithmetic, not of one CPU's codegen. Sizes keep D >= 16 and
blocks >= 16, so on a GPU the same tests run the compiled Triton kernel.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from fvq_jax.quantizers import ops, pallas_search

PRECISIONS = ("fp32", "tf32", "bf16")


def _grid_data(n, k, d, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.integers(-16, 17, size=(n, d)) / 8
    e = rng.integers(-16, 17, size=(k, d)) / 8
    return jnp.asarray(z, jnp.float32), jnp.asarray(e, jnp.float32)


def _kernel(z, e, precision="fp32", **kw):
    return pallas_search.nearest_code(z, ops.squared_norms(z), ops.cast_codebook(e, precision), ops.squared_norms(e),
                                      precision=precision, **kw)


def _first_argmin(z, e):
    d = ((np.asarray(z, np.float64)[:, None] - np.asarray(e, np.float64)[None]) ** 2).sum(-1)
    return d.argmin(-1)  # numpy's argmin is the first minimum


@pytest.mark.parametrize("layout", pallas_search.LAYOUTS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_equals_the_xla_search(layout, precision):
    """200 tokens, 300 codes: neither a multiple of the 64 x 32 blocks; many exact ties."""
    z, e = _grid_data(200, 300, 16)
    got = np.asarray(_kernel(z, e, precision, layout=layout, block_tokens=64, block_codes=32))
    naive = np.asarray(ops.nearest_code(z, e, precision=precision))
    tiled = np.asarray(ops.nearest_code(z, e, precision=precision, tile_size=64, token_chunk=48))
    np.testing.assert_array_equal(got, naive)
    np.testing.assert_array_equal(got, tiled)
    np.testing.assert_array_equal(got, _first_argmin(z, e))


@pytest.mark.parametrize("layout", pallas_search.LAYOUTS)
def test_planted_ties_go_to_the_lowest_index(layout):
    z, e = _grid_data(20, 40, 16, seed=1)
    e = np.asarray(e).copy()
    e[21] = e[3]  # across code tiles of 16
    e[38] = e[3]
    e[11] = e[10]  # inside one tile
    z = jnp.asarray(np.concatenate([e[[3, 21, 38, 10, 11]], np.asarray(z)]))
    e = jnp.asarray(e)
    got = np.asarray(_kernel(z, e, layout=layout, block_tokens=16, block_codes=16))
    np.testing.assert_array_equal(got[:5], [3, 3, 3, 10, 10])
    np.testing.assert_array_equal(got, np.asarray(ops.nearest_code(z, e)))


def test_float_data_and_default_blocks_through_ops():
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.normal(size=(300, 16)), jnp.float32)
    e = jnp.asarray(rng.normal(size=(97, 16)), jnp.float32)
    got = ops.nearest_code(z, e, impl="pallas")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ops.nearest_code(z, e, tile_size=32)))
    np.testing.assert_array_equal(np.asarray(got), _first_argmin(z, e))


def test_bf16_codebook_is_read_exactly():
    z, e = _grid_data(70, 90, 16, seed=3)
    e16 = e.astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(ops.nearest_code(z, e16, impl="pallas")),
                                  np.asarray(ops.nearest_code(z, e)))


def test_quantize_values_and_gradients_do_not_depend_on_the_search_impl():
    """The straight-through estimator and the losses see only the indices."""
    z, e = _grid_data(64, 50, 16, seed=4)
    z = z + 0.01 * jax.random.normal(jax.random.key(0), z.shape)  # no ties: one answer for every path
    w = jax.random.normal(jax.random.key(1), z.shape)

    def run(impl):
        def f(z, e):
            out = ops.quantize(z, e, impl=impl)
            return out["loss"] + jnp.sum(w * out["z_q"]), out
        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(z, e)

    (loss, out), grads = run("pallas")
    (ref_loss, ref), ref_grads = run("xla")
    np.testing.assert_array_equal(np.asarray(out["indices"]), np.asarray(ref["indices"]))
    np.testing.assert_array_equal(np.asarray(loss), np.asarray(ref_loss))
    for g, r in zip(grads, ref_grads):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


@pytest.mark.parametrize("platform,target", [("gpu", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_lowers_for_gpu_and_tpu(platform, target, precision):
    """Pallas lowers the kernel for the accelerator (Triton IR for GPUs, Mosaic for TPUs) on this
    host. This checks the kernel against Pallas's lowering rules only: Triton's and Mosaic's own
    compilers run on the device and have not seen it here."""
    def search(z, e):
        return _kernel(z, e, precision, platform=platform)

    shapes = (jax.ShapeDtypeStruct((1000, 256), jnp.float32), jax.ShapeDtypeStruct((16384 + 3 * 64, 256), jnp.float32))
    exported = export.export(jax.jit(search), platforms=[target], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*shapes)
    call = "__gpu$xla.gpu.triton" if platform == "gpu" else "tpu_custom_call"
    assert call in exported.mlir_module()


def test_unknown_impl_and_layout_are_rejected():
    z, e = _grid_data(4, 4, 16)
    with pytest.raises(ValueError, match="search impl must be one of"):
        ops.nearest_code(z, e, impl="triton")
    with pytest.raises(ValueError, match="layout must be one of"):
        _kernel(z, e, layout="rows")

"""Quantizer math against numpy references, and the straight-through estimator's gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvq_jax.quantizers import ops


def _np_distances(z, e):
    z = z.astype(np.float64)
    e = e.astype(np.float64)
    return ((z[:, None, :] - e[None, :, :]) ** 2).sum(-1)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 16)).astype(np.float32)
    e = rng.normal(size=(97, 16)).astype(np.float32)
    return z, e


def test_squared_distances_match_numpy(data):
    z, e = data
    got = np.asarray(ops.squared_distances(jnp.asarray(z), jnp.asarray(e)))
    want = _np_distances(z, e)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_nearest_code_matches_numpy(data):
    z, e = data
    got = np.asarray(ops.nearest_code(jnp.asarray(z), jnp.asarray(e)))
    np.testing.assert_array_equal(got, _np_distances(z, e).argmin(-1))


@pytest.mark.parametrize("tile_size,token_chunk", [(10, None), (32, 64), (96, 7), (97, None), (1, 300)])
def test_tiled_search_equals_naive_argmin(data, tile_size, token_chunk):
    z, e = data
    naive = ops.nearest_code(jnp.asarray(z), jnp.asarray(e))
    tiled = ops.nearest_code(jnp.asarray(z), jnp.asarray(e), tile_size=tile_size, token_chunk=token_chunk)
    np.testing.assert_array_equal(np.asarray(tiled), np.asarray(naive))


@pytest.mark.parametrize("tile_size", [None, 4, 7, 16])
def test_ties_resolve_to_lowest_index(tile_size):
    rng = np.random.default_rng(1)
    e = rng.normal(size=(40, 8)).astype(np.float32)
    # Plant exact duplicates across tile boundaries: codes 3 == 21 == 38 and 10 == 11.
    e[21] = e[3]
    e[38] = e[3]
    e[11] = e[10]
    z = np.concatenate([e[[3, 21, 38, 10, 11]], rng.normal(size=(20, 8)).astype(np.float32)])
    idx = np.asarray(ops.nearest_code(jnp.asarray(z), jnp.asarray(e), tile_size=tile_size))
    np.testing.assert_array_equal(idx[:5], [3, 3, 3, 10, 10])
    np.testing.assert_array_equal(idx, np.argmin(_np_distances(z, e), -1))


def test_bf16_search_mostly_agrees_with_fp32():
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.normal(size=(512, 64)), jnp.float32)
    e = jnp.asarray(rng.normal(size=(1024, 64)), jnp.float32)
    exact = ops.nearest_code(z, e)
    approx = ops.nearest_code(z, e, precision="bf16", tile_size=256)
    agreement = float(jnp.mean(exact == approx))
    assert 0.9 < agreement <= 1.0
    # The chosen code is never much farther than the true nearest one.
    d = np.asarray(ops.squared_distances(z, e))
    rows = np.arange(512)
    assert np.all(d[rows, np.asarray(approx)] <= d[rows, np.asarray(exact)] * 1.01 + 1e-3)


def test_quantize_values_match_numpy(data):
    z, e = data
    out = ops.quantize(jnp.asarray(z).reshape(3, 10, 10, 16), jnp.asarray(e), beta=0.25)
    idx = _np_distances(z, e).argmin(-1)
    zq = e[idx]
    np.testing.assert_array_equal(np.asarray(out["indices"]).reshape(-1), idx)
    np.testing.assert_allclose(np.asarray(out["z_q"]).reshape(-1, 16), zq, rtol=1e-6)
    mse = np.mean((zq.astype(np.float64) - z) ** 2)
    np.testing.assert_allclose(float(out["codebook_loss"]), mse, rtol=1e-5)
    np.testing.assert_allclose(float(out["commitment_loss"]), 0.25 * mse, rtol=1e-5)
    np.testing.assert_allclose(float(out["loss"]), 1.25 * mse, rtol=1e-5)
    counts = np.bincount(idx, minlength=97) / idx.size
    p = counts[counts > 0]
    np.testing.assert_allclose(float(out["perplexity"]), np.exp(-(p * np.log(p)).sum()), rtol=1e-5)


def test_entropy_loss_matches_numpy(data):
    z, e = data
    t = 0.5
    logits = -_np_distances(z, e) / t
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    sample = -np.mean(np.sum(probs * np.log(probs + 1e-30), -1))
    avg = probs.mean(0)
    want = sample + np.sum(avg * np.log(avg + 1e-5))
    got = float(ops.entropy_loss(jnp.asarray(z), jnp.asarray(e), temperature=t))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_l2_norm_quantizes_on_the_sphere(data):
    z, e = data
    out = ops.quantize(jnp.asarray(z), jnp.asarray(e), l2_norm=True)
    zn = z / np.linalg.norm(z, axis=-1, keepdims=True)
    en = e / np.linalg.norm(e, axis=-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(out["indices"]), (zn @ en.T).argmax(-1))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out["z_q"]), axis=-1), 1.0, rtol=1e-5)


def test_straight_through_gradient_equals_stop_gradient_form():
    rng = np.random.default_rng(3)
    z = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    zq = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)

    def loss(fn):
        return lambda z, zq: jnp.sum(w * jnp.sin(fn(z, zq)))

    ste = loss(ops.straight_through)
    reference = loss(lambda z, zq: z + jax.lax.stop_gradient(zq - z))
    np.testing.assert_allclose(ste(z, zq), reference(z, zq), rtol=1e-6)
    g_ste = jax.grad(ste, argnums=(0, 1))(z, zq)
    g_ref = jax.grad(reference, argnums=(0, 1))(z, zq)
    # z + (z_q - z) rounds differently from z_q: equal up to float32 rounding.
    np.testing.assert_allclose(g_ste[0], g_ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(g_ste[1], 0.0)
    np.testing.assert_array_equal(g_ref[1], 0.0)
    # The gradient is cos(z_q) * w evaluated at the quantized value, passed to z unchanged.
    np.testing.assert_allclose(g_ste[0], w * jnp.cos(zq), rtol=1e-6)


def test_quantize_gradient_paths(data):
    """Downstream losses reach z through the STE only; the codebook learns only from the codebook loss."""
    z, e = jnp.asarray(data[0]), jnp.asarray(data[1])
    w = jnp.asarray(np.random.default_rng(4).normal(size=z.shape), jnp.float32)

    def term(name):
        def f(z, e):
            out = ops.quantize(z, e, beta=0.25)
            return jnp.sum(w * out["z_q"]) if name == "downstream" else out[name]
        return jax.grad(f, argnums=(0, 1))

    gz, ge = term("downstream")(z, e)
    np.testing.assert_allclose(gz, w, rtol=1e-6)  # identity to z
    np.testing.assert_array_equal(ge, 0.0)
    gz, ge = term("commitment_loss")(z, e)
    np.testing.assert_array_equal(ge, 0.0)
    zq = e[ops.nearest_code(z, e)]
    np.testing.assert_allclose(gz, 0.25 * 2 * (z - zq) / z.size, rtol=1e-5, atol=1e-9)
    gz, ge = term("codebook_loss")(z, e)
    np.testing.assert_array_equal(gz, 0.0)
    idx = np.asarray(ops.nearest_code(z, e))
    want = np.zeros(e.shape, np.float64)
    np.add.at(want, idx, 2 * (np.asarray(zq) - np.asarray(z)) / z.size)
    np.testing.assert_allclose(ge, want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("tile_size,precision", [(None, "fp32"), (32, "fp32"), (32, "tf32"), (32, "bf16")])
def test_bf16_codebook_is_searched_by_its_exact_values(data, tile_size, precision):
    z, e = jnp.asarray(data[0]), jnp.asarray(data[1]).astype(jnp.bfloat16)
    got = ops.nearest_code(z, e, precision=precision, tile_size=tile_size)
    want = ops.nearest_code(z, e.astype(jnp.float32), precision=precision, tile_size=tile_size)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_quantize_takes_a_bf16_codebook_like_its_float32_copy(data):
    """Same indices, values and losses; the codebook gradient is the float32 one, rounded once."""
    z, e = jnp.asarray(data[0]), jnp.asarray(data[1]).astype(jnp.bfloat16)
    w = jnp.asarray(np.random.default_rng(5).normal(size=z.shape), jnp.float32)

    def f(z, e):
        out = ops.quantize(z, e, tile_size=32)
        return out["loss"] + jnp.sum(w * out["z_q"]), out

    (loss, out), (gz, ge) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(z, e)
    (ref_loss, ref), (ref_gz, ref_ge) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(z, e.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(out["indices"]), np.asarray(ref["indices"]))
    assert out["z_q"].dtype == jnp.float32 and ge.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["z_q"]), np.asarray(ref["z_q"]))
    np.testing.assert_array_equal(np.asarray(loss), np.asarray(ref_loss))
    np.testing.assert_array_equal(np.asarray(gz), np.asarray(ref_gz))
    np.testing.assert_array_equal(np.asarray(ge), np.asarray(ref_ge.astype(jnp.bfloat16)))

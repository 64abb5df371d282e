"""PSNR and SSIM against scikit-image on random image pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fvq_jax.evaluation.image_metrics import gaussian_window, psnr, ssim


def image_pairs(low, high, shape=(3, 24, 20, 3), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(low, high, shape)
    # Reconstructions: the image plus noise of several strengths, clipped to the range.
    noise = rng.normal(size=shape) * np.array([0.02, 0.1, 0.4]).reshape(-1, 1, 1, 1) * (high - low)
    return x.astype(np.float32), np.clip(x + noise, low, high).astype(np.float32)


@pytest.mark.parametrize("low,high", [(-1.0, 1.0), (0.0, 1.0), (0.0, 255.0)])
def test_match_scikit_image(low, high):
    x, y = image_pairs(low, high)
    data_range = high - low
    ours_psnr = jax.jit(lambda a, b: psnr(a, b, data_range=data_range))(x, y)
    ours_ssim = jax.jit(lambda a, b: ssim(a, b, data_range=data_range))(x, y)
    for i in range(len(x)):
        a, b = x[i].astype(np.float64), y[i].astype(np.float64)
        ref_psnr = peak_signal_noise_ratio(a, b, data_range=data_range)
        ref_ssim = structural_similarity(a, b, data_range=data_range, channel_axis=-1, gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False)
        assert float(ours_psnr[i]) == pytest.approx(ref_psnr, rel=1e-5)
        assert float(ours_ssim[i]) == pytest.approx(ref_ssim, abs=2e-5)


def test_identical_images():
    x, _ = image_pairs(-1.0, 1.0)
    assert np.all(np.isinf(psnr(jnp.asarray(x), jnp.asarray(x), data_range=2.0)))
    np.testing.assert_allclose(ssim(jnp.asarray(x), jnp.asarray(x), data_range=2.0), 1.0, atol=1e-6)


def test_window_is_scikit_images():
    taps = gaussian_window(1.5)
    assert taps.size == 11 and taps.sum() == pytest.approx(1.0)
    assert taps[5] / taps[6] == pytest.approx(np.exp(0.5 / 1.5 ** 2))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="one shape"):
        psnr(jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 15, 3)), data_range=2.0)
    with pytest.raises(ValueError, match="at least 11 x 11"):
        ssim(jnp.zeros((1, 8, 16, 3)), jnp.zeros((1, 8, 16, 3)), data_range=2.0)

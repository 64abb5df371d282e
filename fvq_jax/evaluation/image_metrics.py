"""PSNR and SSIM per image in JAX (jittable, batched, NHWC), float32.

`data_range` is the width of the pixel range: 2.0 for images in [-1, 1], 1.0 for [0, 1],
255.0 for 8-bit values. Published tokenizer numbers usually round reconstructions to uint8
first and use 255; pass such images (as float) with data_range=255 to match them.
SSIM is the standard Gaussian-window SSIM (Wang et al. 2004) as scikit-image computes it with
gaussian_weights=True, sigma=1.5, use_sample_covariance=False: an 11 x 11 window (scipy's
Gaussian truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, per channel, averaged over the pixels
whose window lies inside the image and over the channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _check_pair(x: jax.Array, y: jax.Array) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two image batches [B, H, W, C] of one shape, got {x.shape} and {y.shape}")


def psnr(x: jax.Array, y: jax.Array, *, data_range: float) -> jax.Array:
    """x, y: [B, H, W, C] -> [B] PSNR in dB, 10 log10(data_range^2 / MSE); identical images give inf."""
    _check_pair(x, y)
    mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range ** 2 / mse)


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    """Normalised 1-D Gaussian taps, radius int(truncate * sigma + 0.5) (scipy.ndimage's rule)."""
    radius = int(truncate * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _blur_valid(x: jax.Array, taps: np.ndarray) -> jax.Array:
    """Separable per-channel Gaussian filter, 'valid' region only: [B, H, W, C] -> [B, H-k+1, W-k+1, C]."""
    channels = x.shape[-1]
    dn = ("NHWC", "HWIO", "NHWC")
    column = jnp.tile(jnp.asarray(taps).reshape(-1, 1, 1, 1), (1, 1, 1, channels))
    x = jax.lax.conv_general_dilated(x, column, (1, 1), "VALID", dimension_numbers=dn,
                                     feature_group_count=channels, precision=jax.lax.Precision.HIGHEST)
    return jax.lax.conv_general_dilated(x, column.reshape(1, -1, 1, channels), (1, 1), "VALID",
                                        dimension_numbers=dn, feature_group_count=channels,
                                        precision=jax.lax.Precision.HIGHEST)


def ssim(x: jax.Array, y: jax.Array, *, data_range: float, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> jax.Array:
    """x, y: [B, H, W, C] (H, W >= the 11-pixel window) -> [B] mean SSIM."""
    _check_pair(x, y)
    taps = gaussian_window(sigma)
    if min(x.shape[1:3]) < taps.size:
        raise ValueError(f"SSIM needs images of at least {taps.size} x {taps.size} pixels, got {x.shape[1:3]}")
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    c = x.shape[-1]
    # One depthwise pass over the five maps the local moments need.
    moments = _blur_valid(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1), taps)
    mx, my, mxx, myy, mxy = (moments[..., i * c:(i + 1) * c] for i in range(5))
    vx, vy, cov = mxx - mx * mx, myy - my * my, mxy - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(1, 2, 3))

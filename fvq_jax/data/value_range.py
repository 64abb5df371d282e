"""The image value range, both ways: uint8 pixels [0, 255] <-> the models' float range [-1, 1].

Every conversion in the package goes through these two functions. Both take numpy or jax arrays and
compute in float32 with the same operations either way, so a host conversion and a device one give the
same pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np  # tracers are jax.Arrays too


def to_model_range(images):
    """uint8 [..., 3] in [0, 255] -> float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    xp = _xp(images)
    # Centred before scaling: the endpoints come out exactly -1 and 1 (x / 127.5 - 1 gives 1.0000001).
    return (xp.asarray(images).astype(xp.float32) - 127.5) / 127.5


def to_pixel_levels(images):
    """Floats in [-1, 1] -> float32 8-bit levels: round((clip(x, -1, 1) + 1) * 127.5), in [0, 255]."""
    xp = _xp(images)
    x = xp.asarray(images).astype(xp.float32)
    return xp.round((xp.clip(x, -1.0, 1.0) + 1.0) * xp.float32(127.5))


def to_uint8(images):
    """Floats in [-1, 1] -> uint8 [0, 255] (clipped and rounded: `to_pixel_levels`)."""
    xp = _xp(images)
    return to_pixel_levels(images).astype(xp.uint8)

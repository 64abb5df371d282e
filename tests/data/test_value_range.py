"""The image value range both ways, on the host and on the device."""

import jax
import jax.numpy as jnp
import numpy as np

from fvq_jax.data.value_range import to_model_range, to_pixel_levels, to_uint8


def test_every_level_survives_the_round_trip_on_host_and_device():
    levels = np.arange(256, dtype=np.uint8)
    model = to_model_range(levels)
    assert model.dtype == np.float32 and model[0] == -1.0 and model[255] == 1.0
    np.testing.assert_array_equal(to_uint8(model), levels)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: to_uint8(to_model_range(x)))(jnp.asarray(levels))),
                                  levels)


def test_host_and_device_agree_and_clip():
    x = np.random.default_rng(0).uniform(-1.3, 1.3, (4096,)).astype(np.float32)
    x[:4] = [-2.0, 2.0, 0.0, np.float32(1 / 255)]
    host, device = to_pixel_levels(x), np.asarray(jax.jit(to_pixel_levels)(jnp.asarray(x)))
    np.testing.assert_array_equal(host, device)
    # Clipped to [-1, 1], then (x + 1) * 127.5 rounded half to even: 0 -> 127.5 -> 128.
    np.testing.assert_array_equal(host[:3], [0.0, 255.0, 128.0])
    expected = np.round((np.clip(x.astype(np.float64), -1, 1) + 1) * 127.5)
    assert np.abs(host - expected).max() <= 1.0
    assert to_uint8(x).dtype == np.uint8 and isinstance(to_uint8(jnp.asarray(x)), jax.Array)


def test_to_model_range_is_the_affine_map():
    values = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
    out = jax.jit(to_model_range)(jnp.asarray(values))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), values.astype(np.float64) * 2 / 255 - 1, atol=1e-6)

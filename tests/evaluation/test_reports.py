"""Reconstruction grids and usage plots as PNG, metrics.json."""

import json

import jax.numpy as jnp
import numpy as np
from PIL import Image

from fvq_jax.evaluation import reports


def test_reconstruction_grid_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    inputs = rng.uniform(-1, 1, (3, 6, 5, 3)).astype(np.float32)
    recons = np.clip(inputs + 0.1, -1, 1)
    path = reports.save_reconstruction_grid(jnp.asarray(inputs), recons, tmp_path / "grid.png", max_images=2, pad=1)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 6 + 3, 2 * 5 + 3, 3)
    # The grid's pixels are value_range.to_uint8's, written here without it.
    expected_in, expected_out = (np.round((np.clip(x, -1, 1) + 1) * np.float32(127.5)).astype(np.uint8)
                                 for x in (inputs, recons))
    np.testing.assert_array_equal(grid[1:7, 1:6], expected_in[0])
    np.testing.assert_array_equal(grid[8:14, 7:12], expected_out[1])
    assert np.all(grid[0] == 255) and np.all(grid[:, 6] == 255)


def _dead_region_pixels(path):
    # tab:red at alpha 0.2 over white is about (247, 212, 212).
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(np.sum(np.all(np.abs(image - [247, 212, 212]) <= 4, axis=-1)))


def test_usage_histogram_marks_dead_codes(tmp_path):
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 1000, 512)
    healthy = reports.save_usage_histogram(counts, tmp_path / "healthy.png", size=(4, 3), dpi=50)
    counts[::3] = 0
    collapsed = reports.save_usage_histogram(counts, tmp_path / "collapsed.png", size=(4, 3), dpi=50)
    assert Image.open(healthy).size == (200, 150)
    assert _dead_region_pixels(healthy) == 0
    assert _dead_region_pixels(collapsed) > 500


def test_metrics_json(tmp_path):
    metrics = {"rfid": np.float64(1.25), "psnr": jnp.float32(float("inf")), "usage": {"dead": np.int64(0)},
               "per_split": jnp.arange(3), "weights": "abc", "ok": True}
    data = json.loads(reports.write_metrics_json(metrics, tmp_path / "eval" / "metrics.json").read_text())
    assert data == {"rfid": 1.25, "psnr": "inf", "usage": {"dead": 0}, "per_split": [0, 1, 2],
                    "weights": "abc", "ok": True}

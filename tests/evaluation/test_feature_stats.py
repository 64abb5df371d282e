"""Running feature statistics with padding masks, statistics and image-set files (written atomically), ADM-style
reference batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvq_jax.evaluation import feature_stats
from fvq_jax.evaluation.feature_stats import (FeatureStats, ImageSet, RunningStats, atomic_savez, load_image_set,
                                              load_images, load_stats, save_image_set)


def test_running_stats_match_numpy_with_masks():
    rng = np.random.default_rng(0)
    # float32 features like the network's; a large offset stresses cancellation.
    features = (rng.gamma(2.0, 1.0, size=(103, 16)) + 100.0).astype(np.float32)
    stats = RunningStats(16)
    kept = []
    for i, start in enumerate(range(0, 103, 20)):
        batch = features[start:start + 20]
        mask = rng.uniform(size=len(batch)) < 0.7
        stats.update(jnp.asarray(batch) if i % 2 else batch, mask=jnp.asarray(mask) if i % 2 else mask)
        kept.append(batch[mask])
    kept = np.concatenate(kept).astype(np.float64)
    result = stats.result("test")
    assert result.count == len(kept)
    np.testing.assert_allclose(result.mu, kept.mean(0), rtol=1e-12)
    np.testing.assert_allclose(result.sigma, np.cov(kept, rowvar=False), rtol=1e-9, atol=1e-12)


def test_running_stats_accept_sharded_batches():
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    x = np.arange(8 * jax.device_count() * 4, dtype=np.float32).reshape(-1, 4) ** 0.5
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    stats = RunningStats(4)
    stats.update(sharded)
    np.testing.assert_allclose(stats.result("").sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9)


def test_running_stats_errors():
    stats = RunningStats(4)
    with pytest.raises(ValueError, match=r"features must be \[B, 4\]"):
        stats.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="mask has 3 entries for 2"):
        stats.update(np.zeros((2, 4)), mask=np.ones(3, bool))
    stats.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        stats.result("")


def test_stats_file_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    stats = FeatureStats(rng.normal(size=8), np.eye(8) * 2.0, 1234, "imagenet val 256 center crop")
    loaded = load_stats(stats.save(tmp_path / "ref" / "stats.npz"))
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.count == 1234 and loaded.description == stats.description


def test_adm_reference_batch(tmp_path):
    # VIRTUAL_imagenet256_labeled.npz layout: arr_0 images, mu, sigma (and spatial mu_s, sigma_s).
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(path, arr_0=images, mu=np.ones(8, np.float32), sigma=np.eye(8, dtype=np.float32),
             mu_s=np.zeros(4), sigma_s=np.eye(4))
    stats = load_stats(path)
    assert stats.count == -1 and "ADM-style" in stats.description and stats.mu.dtype == np.float64
    np.testing.assert_array_equal(load_images(path), images)

    only_images = tmp_path / "images.npz"
    np.savez(only_images, arr_0=images)
    with pytest.raises(ValueError, match="needs them computed from its images"):
        load_stats(only_images)
    stats_only = tmp_path / "stats_only.npz"
    np.savez(stats_only, mu=np.zeros(2), sigma=np.eye(2))
    with pytest.raises(ValueError, match="holds no images"):
        load_images(stats_only)


def test_image_set_round_trip_and_damage(tmp_path):
    rng = np.random.default_rng(3)
    features = rng.normal(size=(6, 4)).astype(np.float32)
    stats = RunningStats(4)
    stats.update(features)
    image_set = ImageSet(stats.result("six"), features, np.arange(6) % 2, "a set of six")
    path = save_image_set(tmp_path / "set.npz", image_set, key=np.array("k"))
    loaded, extra = load_image_set(path)
    np.testing.assert_array_equal(loaded.features, features)
    np.testing.assert_array_equal(loaded.labels, image_set.labels)
    np.testing.assert_allclose(loaded.stats.sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-9)
    assert (loaded.count, loaded.description, loaded.stats.description, str(extra["key"])) == (6, "a set of six", "six", "k")
    unlabelled, _ = load_image_set(save_image_set(tmp_path / "unlabelled.npz", ImageSet(stats.result(""), features,
                                                                                         None, "")))
    assert unlabelled.labels is None
    atomic_savez(tmp_path / "short.npz", **dict(np.load(path), features=features[:5]))
    with pytest.raises(ValueError, match="short.npz: shapes do not fit together"):
        load_image_set(tmp_path / "short.npz")
    stats.result("").save(tmp_path / "stats.npz")
    with pytest.raises(ValueError, match=r"stats.npz is not a saved image set: \['features', 'set_description'\]"):
        load_image_set(tmp_path / "stats.npz")


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_part(tmp_path, monkeypatch):
    path = tmp_path / "stats.npz"
    FeatureStats(np.zeros(3), np.eye(3), 7, "old").save(path)

    def savez_then_fail(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(feature_stats.np, "savez", savez_then_fail)
    with pytest.raises(OSError, match="disk full"):
        FeatureStats(np.ones(3), np.eye(3), 9, "new").save(path)
    monkeypatch.undo()
    assert load_stats(path).description == "old" and [p.name for p in tmp_path.iterdir()] == ["stats.npz"]

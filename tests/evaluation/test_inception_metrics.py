"""FID / IS accumulation with the real Inception: padding masks, reference caching, sharded batches."""

import numpy as np
import pytest
from flax import nnx

from fvq_jax.evaluation.feature_stats import FeatureStats
from fvq_jax.evaluation.inception_metrics import InceptionMetrics, fixed_batches, reference_stats, stats_from_images
from fvq_jax.evaluation.inception_score import inception_score
from fvq_jax.models.inception import InceptionV3, load_inception
from tests.inception_weights import export_with_head


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return export_with_head(tmp_path_factory.mktemp("inception"))


@pytest.fixture(scope="module")
def model(weights):
    return load_inception(weights)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def whole(model, images):
    """All five images in one unpadded batch."""
    metrics = InceptionMetrics(model, data_range=None)
    metrics.update(images)
    return metrics


def test_padded_batches_match_one_batch(model, images, whole):
    # Batches of 3: the second holds 2 images and one masked padding row.
    stats = stats_from_images(images, model, batch_size=3, description="five test images")
    ref = whole.feature_stats("")
    assert stats.count == ref.count == 5
    np.testing.assert_allclose(stats.mu, ref.mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.sigma, ref.sigma, rtol=1e-4, atol=1e-6)
    assert model.weights_sha256 in stats.description and "five test images" in stats.description
    assert np.concatenate(whole.logits).shape == (5, 1008)
    assert whole.inception_score(splits=5) == inception_score(np.concatenate(whole.logits), 5)


def test_reference_images_are_computed_once_and_cached(model, images, whole, tmp_path):
    path = tmp_path / "ref_batch.npz"
    np.savez(path, arr_0=images)
    stats = reference_stats(path, model, batch_size=3)
    cache = tmp_path / "ref_batch.inception_stats.npz"
    assert cache.is_file()
    np.testing.assert_allclose(stats.mu, whole.feature_stats("").mu, rtol=1e-5, atol=1e-6)
    cached = reference_stats(path)  # no model needed any more
    np.testing.assert_array_equal(cached.sigma, stats.sigma)
    FeatureStats(stats.mu, stats.sigma, 5, "made with other weights").save(cache)
    with pytest.raises(ValueError, match="other Inception weights"):
        reference_stats(path, model)


def test_inception_score_needs_the_classifier_head():
    features_only = nnx.eval_shape(lambda: InceptionV3(with_logits=False))
    with pytest.raises(ValueError, match="no classifier head"):
        InceptionMetrics(features_only).inception_score()


def test_sharded_batches_over_two_devices(weights, python_runner):
    # A fresh process with two simulated CPU devices: the batch is sharded over 'data'.
    out = python_runner(f"""
        import jax, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from fvq_jax.evaluation.inception_metrics import InceptionMetrics
        from fvq_jax.models.inception import load_inception
        assert jax.device_count() == 2, jax.devices()
        model = load_inception({str(weights)!r})
        mesh = jax.make_mesh((2,), ("data",))
        images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
        mask = np.array([True, True, True, False])
        sharded = InceptionMetrics(model, data_range=None, mesh=mesh)
        put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
        sharded.update(put(images), mask=put(mask))
        single = InceptionMetrics(model, data_range=None)
        single.update(images[:3])
        assert sharded.count == 3
        np.testing.assert_allclose(sharded.stats.mean, single.stats.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.concatenate(sharded.logits), np.concatenate(single.logits), atol=1e-4)
        print("sharded ok")
    """, num_devices=2, timeout=300)
    assert "sharded ok" in out


def test_fixed_batches_keep_the_order_across_arrays():
    arrays = [np.arange(n * 2).reshape(n, 2) + 100 * i for i, n in enumerate((2, 7, 0, 4))]
    batches = list(fixed_batches(arrays, 3))
    assert [int(mask.sum()) for _, mask in batches] == [3, 3, 3, 3, 1]
    joined = np.concatenate([batch[mask] for batch, mask in batches])
    np.testing.assert_array_equal(joined, np.concatenate(arrays))
    assert not batches[-1][0][1:].any()  # zero padding

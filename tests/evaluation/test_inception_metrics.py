"""FID / IS accumulation with the real Inception: padding masks, one program per shape, sharded batches."""

import numpy as np
import pytest
from flax import nnx

from fvq_jax.evaluation import inception_metrics
from fvq_jax.evaluation.inception_metrics import InceptionMetrics, fixed_batches, metrics_from_images
from fvq_jax.evaluation.inception_score import inception_score
from fvq_jax.models.inception import InceptionV3, load_inception
from fvq_jax.progress import Progress
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
    metrics = InceptionMetrics(model, data_range=None, keep_features=True)
    metrics.update(images)
    return metrics


def test_padded_batches_match_one_batch(model, images, whole):
    # Batches of 3: the second holds 2 images and one masked padding row.
    stats = metrics_from_images([images], model, batch_size=3).feature_stats("five test images")
    ref = whole.feature_stats("")
    assert stats.count == ref.count == 5
    np.testing.assert_allclose(stats.mu, ref.mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.sigma, ref.sigma, rtol=1e-4, atol=1e-6)
    assert model.weights_sha256 in stats.description and "five test images" in stats.description
    assert np.concatenate(whole.logits).shape == (5, 1008)
    assert whole.inception_score(splits=5) == inception_score(np.concatenate(whole.logits), 5)


def test_a_pass_compiles_once_and_reports_its_progress(model, images, whole, capsys):
    # 5 + 2 images in batches of 3 (the shape test_padded_batches_match_one_batch compiles too): two full batches
    # and a padded one run one program; `transform` sees every padded batch; progress counts real images only.
    seen = []

    def transform(batch):
        seen.append(batch.shape)
        return batch

    before = inception_metrics._forward._cache_size()
    metrics = metrics_from_images([images, images[:2]], model, batch_size=3, keep_features=True, transform=transform,
                                  progress=Progress("test pass", 7, every=0))
    assert inception_metrics._forward._cache_size() <= before + 1 and seen == [(3, 16, 16, 3)] * 3
    np.testing.assert_allclose(metrics.features()[:5], whole.features(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics.features()[5:], whole.features()[:2], rtol=1e-5, atol=1e-5)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["test pass 3/7 images", "test pass 6/7 images",
                                                       "test pass 7/7 images"]
    assert all(" images/s  ETA " in line for line in lines)


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

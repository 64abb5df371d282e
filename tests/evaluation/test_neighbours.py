"""Precision / recall and class consistency against brute-force numpy on random features."""

import numpy as np
import pytest

from fvq_jax.evaluation import neighbours


def brute_force_precision_recall(real, fake, k):
    """The whole distance matrices at once, float64; the k-th neighbour skips the point itself."""
    def radii(x):
        d = np.sum((x[:, None] - x[None]) ** 2, -1)
        return np.sort(d, axis=1)[:, k]

    def inside(queries, points, r):
        d = np.sum((queries[:, None] - points[None]) ** 2, -1)
        return np.mean(np.any(d <= r[None], axis=1))

    real, fake = real.astype(np.float64), fake.astype(np.float64)
    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


@pytest.mark.parametrize("chunk", [7, 40, 1000])  # 7 and 40 do not divide 53 or 41
def test_precision_recall_matches_numpy(chunk):
    rng = np.random.default_rng(0)
    real = rng.normal(size=(53, 16)).astype(np.float32)
    fake = (rng.normal(size=(41, 16)) * 0.8 + 0.5).astype(np.float32)  # narrower and shifted: both below 1
    expected = brute_force_precision_recall(real, fake, 3)
    assert 0.1 < expected[0] < 0.95 and 0.1 < expected[1] < 0.95
    assert neighbours.precision_recall(real, fake, k=3, chunk=chunk) == pytest.approx(expected, abs=1e-12)


def test_knn_radii_and_identical_sets():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    d = np.sum((x[:, None].astype(np.float64) - x[None]) ** 2, -1)
    np.testing.assert_allclose(neighbours.knn_radii(x, k=2, chunk=4), np.sort(d, axis=1)[:, 2], rtol=1e-5)
    assert neighbours.precision_recall(x, x, chunk=9) == (1.0, 1.0)
    with pytest.raises(ValueError, match="need more than 3 points"):
        neighbours.knn_radii(x[:3])


@pytest.mark.parametrize("chunk", [5, 64])
def test_class_consistency_matches_numpy(chunk):
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(12, 8)).astype(np.float32)
    reference_labels = np.arange(12) % 4  # 4 classes, 3 images each
    features = rng.normal(size=(37, 8)).astype(np.float32)
    labels = rng.integers(0, 5, 37)  # label 4: no reference image, left out
    nearest = np.argmin(np.sum((features[:, None] - reference[None]) ** 2, -1), axis=1)
    counted = labels < 4
    expected = np.mean(reference_labels[nearest][counted] == labels[counted])
    result = neighbours.class_consistency(features, labels, reference, reference_labels, chunk=chunk)
    assert result == dict(class_consistency=pytest.approx(expected, abs=1e-12), chance=0.25, classes=4,
                          counted=int(counted.sum()))
    with pytest.raises(ValueError, match="no sample has a label of the reference"):
        neighbours.class_consistency(features, np.full(37, 9), reference, reference_labels)

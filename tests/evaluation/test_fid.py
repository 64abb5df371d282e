"""Fréchet distance against scipy.linalg.sqrtm, closed forms, and near-singular statistics."""

import numpy as np
import pytest
import scipy.linalg

from fvq_jax.evaluation.feature_stats import FeatureStats
from fvq_jax.evaluation.fid import fid, fid_of_features, frechet_distance


def scipy_reference(mu1, s1, mu2, s2):
    """The usual formula: sqrtm of the (non-symmetric) product, real part."""
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


def random_stats(rng, dim, samples):
    x = rng.normal(size=(samples, dim)) @ rng.normal(size=(dim, dim)) + rng.normal(size=dim)
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scipy_sqrtm(seed):
    rng = np.random.default_rng(seed)
    mu1, s1 = random_stats(rng, 64, 500)
    mu2, s2 = random_stats(rng, 64, 500)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), scipy_reference(mu1, s1, mu2, s2)
    assert abs(ours - ref) / abs(ref) < 1e-6


def test_set_against_itself_is_zero():
    rng = np.random.default_rng(3)
    mu, s = random_stats(rng, 64, 500)
    stats = FeatureStats(mu, s, 500, "")
    assert abs(fid(stats, stats)) < 1e-8 * np.trace(s)


def test_one_dimension_closed_form():
    # (m1 - m2)^2 + (sqrt(v1) - sqrt(v2))^2
    value = frechet_distance([1.0], [[4.0]], [3.0], [[9.0]])
    assert value == pytest.approx(4.0 + 1.0, rel=1e-12)


def test_rank_deficient_covariances():
    # Fewer samples than dimensions (a small eval set): singular S1 S2, where sqrtm struggles.
    rng = np.random.default_rng(4)
    mu1, s1 = random_stats(rng, 64, 20)
    mu2, s2 = random_stats(rng, 64, 30)
    ours = frechet_distance(mu1, s1, mu2, s2)
    # Reference: the eigenvalues of S1 S2 (real, >= 0 up to round-off) in extended steps.
    eig = np.linalg.eigvals(s1 @ s2)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(eig.real, 0, None)))
    assert np.isfinite(ours) and abs(ours - ref) / ref < 1e-6


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


@pytest.mark.parametrize("samples", [20, 100])  # fewer than the 64 dimensions (the n x n form), and more
def test_fid_of_features_matches_the_statistics(samples):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(samples, 64)) @ rng.normal(size=(64, 64)) + 1.0
    mu2, s2 = random_stats(rng, 64, 30)
    expected = frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu2, s2)
    # rel 1e-7: the F x F route rounds the square roots of the zero eigenvalues of a rank-deficient S1
    assert fid_of_features(x, FeatureStats(mu2, s2, 30, "")) == pytest.approx(expected, rel=1e-7)

"""Fréchet distance between Gaussians fitted to Inception features (FID), float64 on the host.

FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

The usual code takes scipy.linalg.sqrtm(S1 S2), which goes through a complex Schur form, can
return non-finite or complex values when the product is near-singular (fewer samples than the
2048 feature dimensions), and then needs an eps * I offset. We use that S1 S2 = R (R S2) with
R = S1^(1/2) has the same eigenvalues as the symmetric positive semi-definite R S2 R, so
tr((S1 S2)^(1/2)) = sum(sqrt(eig(R S2 R))): two symmetric eigendecompositions, real throughout,
no offset. Eigenvalues below zero can only be round-off; larger negative ones mean an input was
not a covariance matrix and raise.

With the features of fewer samples than dimensions at hand (a few hundred generated samples of
2048-d features), `fid_of_features` needs one small eigendecomposition instead (see there).
"""

from __future__ import annotations

import numpy as np

from fvq_jax.evaluation.feature_stats import FeatureStats

# Negative eigenvalues larger than this fraction of the largest one are not round-off.
PSD_TOLERANCE = 1e-8


def _psd_eigenvalues(matrix: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    if w.size and w[0] < -PSD_TOLERANCE * max(abs(w[-1]), np.finfo(np.float64).tiny):
        raise ValueError(f"{name} is not positive semi-definite (eigenvalue {w[0]:.3g}, largest {w[-1]:.3g})")
    return np.clip(w, 0.0, None), v


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a positive semi-definite matrix [F, F]."""
    w, v = _psd_eigenvalues(sigma, "sigma")
    return (v * np.sqrt(w)) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) for positive semi-definite sigma1, sigma2 [F, F]."""
    root = psd_sqrt(sigma1)
    w, _ = _psd_eigenvalues(root @ sigma2 @ root, "sigma1^(1/2) sigma2 sigma1^(1/2)")
    return float(np.sum(np.sqrt(w)))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID between N(mu1, sigma1) and N(mu2, sigma2); mu: [F], sigma: [F, F]; float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    f = mu1.shape[0]
    if mu1.shape != (f,) or mu2.shape != (f,) or sigma1.shape != (f, f) or sigma2.shape != (f, f):
        raise ValueError(f"shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {sigma2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def fid(stats: FeatureStats, reference: FeatureStats) -> float:
    """FID between two sets of feature statistics."""
    return frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)


def fid_of_features(features, reference: FeatureStats) -> float:
    """FID of the Gaussian fitted to features [n, F] (unbiased covariance, as np.cov) against `reference`.

    For n <= F the covariance is A^T A with A = (x - mu) / sqrt(n - 1) [n, F], and S1 S2 = A^T (A S2) has
    the nonzero eigenvalues of the symmetric n x n matrix A S2 A^T: one n x n eigendecomposition replaces
    two F x F ones (seconds to milliseconds on a CPU for n = 500, F = 2048). Larger n go through the
    statistics and `frechet_distance`.
    """
    x = np.asarray(features, np.float64)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n}")
    mu = x.mean(axis=0)
    if n > x.shape[1]:
        return frechet_distance(mu, np.cov(x, rowvar=False), reference.mu, reference.sigma)
    a = (x - mu) / np.sqrt(n - 1)
    sigma2 = np.asarray(reference.sigma, np.float64)
    w, _ = _psd_eigenvalues(a @ sigma2 @ a.T, "A sigma2 A^T")
    diff = mu - reference.mu
    return float(diff @ diff + np.sum(a * a) + np.trace(sigma2) - 2.0 * np.sum(np.sqrt(w)))

"""Inception feature statistics (mean, covariance, count) for FID: accumulation, files, references.

Statistics files are `.npz` with `mu` [F], `sigma` [F, F], `count` and `description` (how they
were made: data, split, preprocessing, Inception weights checksum). `load_stats` also reads the
ADM / LlamaGen reference batches (`VIRTUAL_imagenet256_labeled.npz`: `mu`, `sigma`, and the
images as `arr_0`); `load_images` reads their `arr_0` when statistics must be computed afresh.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from fvq_jax.evaluation.host import to_host


@dataclasses.dataclass
class FeatureStats:
    """mu: [F] float64; sigma: [F, F] float64 (unbiased, as np.cov); count: samples (-1 unknown)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    description: str

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file object keeps np.savez from renaming the path
            np.savez(f, mu=self.mu, sigma=self.sigma, count=np.int64(self.count),
                     description=np.array(self.description))
        return path


def load_stats(path: str | os.PathLike) -> FeatureStats:
    """Our statistics file, or an ADM-style reference batch holding `mu` and `sigma`."""
    with np.load(path, allow_pickle=False) as data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise ValueError(f"{path} holds no 'mu'/'sigma' statistics (keys: {data.files}); a reference "
                             f"batch with only images ('arr_0') needs `reference_stats` to compute them")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        count = int(data["count"]) if "count" in data.files else -1
        if "description" in data.files:
            description = str(data["description"])
        else:
            description = f"precomputed mu/sigma of {Path(path).name} (ADM-style reference batch)"
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not [F] and [F, F]")
    return FeatureStats(mu, sigma, count, description)


def load_images(path: str | os.PathLike) -> np.ndarray:
    """The images of an ADM-style reference batch: `arr_0`, uint8 [N, H, W, 3]."""
    with np.load(path, allow_pickle=False) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path} holds no images ('arr_0'); keys: {data.files}")
        images = data["arr_0"]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    return images


class RunningStats:
    """Mean and covariance of feature rows, accumulated on the host in float64, batch by batch.

    Each batch's own mean and scatter matrix are merged into the running ones with the pairwise
    update of Chan et al., which avoids the cancellation of sum(x x^T) - n mu mu^T.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self.mean = np.zeros((dim,), np.float64)
        self.scatter = np.zeros((dim, dim), np.float64)

    def update(self, features, mask=None) -> None:
        """features: [B, F] (jax array, sharded or not, or numpy); mask: [B] bool, False = padding."""
        x = to_host(features).astype(np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be [B, {self.dim}], got {x.shape}")
        if mask is not None:
            mask = to_host(mask).reshape(-1).astype(bool)
            if mask.shape[0] != x.shape[0]:
                raise ValueError(f"mask has {mask.shape[0]} entries for {x.shape[0]} feature rows")
            x = x[mask]
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(axis=0)
        centered = x - batch_mean
        delta = batch_mean - self.mean
        total = self.count + n
        self.scatter += centered.T @ centered + np.outer(delta, delta) * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    def result(self, description: str) -> FeatureStats:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        return FeatureStats(self.mean.copy(), self.scatter / (self.count - 1), self.count, description)

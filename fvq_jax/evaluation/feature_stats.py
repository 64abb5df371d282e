"""Inception feature statistics (mean, covariance, count) for FID: accumulation, files, references.

Statistics files are `.npz` with `mu` [F], `sigma` [F, F], `count` and `description` (how they
were made: data, split, preprocessing, Inception weights checksum). `load_stats` also reads the
ADM / LlamaGen reference batches (`VIRTUAL_imagenet256_labeled.npz`: `mu`, `sigma`, and the
images as `arr_0`); `load_images` reads their `arr_0` when statistics must be computed afresh.
An `ImageSet` (statistics, the features themselves, labels, logits) is saved the same way plus those
arrays (`save_image_set` / `load_image_set`: the feature cache's entries). Every file is
written under a temporary name and renamed into place (`atomic_savez`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from etils import epath

from fvq_jax import files
from fvq_jax.evaluation.host import to_host


@dataclasses.dataclass
class FeatureStats:
    """mu: [F] float64; sigma: [F, F] float64 (unbiased, as np.cov); count: samples (-1 unknown)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    description: str

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(mu=self.mu, sigma=self.sigma, count=np.int64(self.count), description=np.array(self.description))

    def save(self, path: str | os.PathLike) -> epath.Path:
        return atomic_savez(path, **self.arrays())


def atomic_savez(path: str | os.PathLike, **arrays: np.ndarray) -> epath.Path:
    """np.savez(path, **arrays), written whole or not at all (`files.write_atomically`; a file object keeps
    np.savez from appending .npz to the name)."""
    return files.write_atomically(path, lambda f: np.savez(f, **arrays))


def load_stats(path: str | os.PathLike) -> FeatureStats:
    """Our statistics file, or an ADM-style reference batch holding `mu` and `sigma`."""
    with np.load(path, allow_pickle=False) as data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise ValueError(f"{path} holds no 'mu'/'sigma' statistics (keys: {data.files}); a reference "
                             f"batch with only images ('arr_0') needs them computed from its images (scoring.py)")
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


@dataclasses.dataclass
class ImageSet:
    """What the scores need of a set of images. stats: pool-feature statistics; features: float32 [N, F];
    labels: [N]; logits: float32 [N, C] (the Inception Score's input); the last three None when unknown (a
    reference given as statistics only, unlabelled images, Inception weights without the classifier head)."""

    stats: FeatureStats
    features: np.ndarray | None
    labels: np.ndarray | None
    description: str
    logits: np.ndarray | None = None

    @property
    def count(self) -> int:
        """Images in the set; -1 when unknown (statistics from a file that does not say, as ADM's)."""
        return len(self.features) if self.features is not None else self.stats.count


def save_image_set(path: str | os.PathLike, image_set: ImageSet, **extra: np.ndarray) -> epath.Path:
    """The set's statistics, features (needed), labels and logits (when known) in one .npz, with `extra` arrays."""
    arrays = dict(image_set.stats.arrays(), features=image_set.features, set_description=np.array(image_set.description),
                  **extra)
    for name in ("labels", "logits"):
        if getattr(image_set, name) is not None:
            arrays[name] = getattr(image_set, name)
    return atomic_savez(path, **arrays)


def load_image_set(path: str | os.PathLike) -> tuple[ImageSet, dict[str, np.ndarray]]:
    """(the ImageSet saved at `path`, its other arrays). ValueError naming the file when the arrays do not fit
    together (a file that is not a saved set, or a damaged one)."""
    with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    missing = {"mu", "sigma", "count", "description", "features", "set_description"} - arrays.keys()
    if missing:
        raise ValueError(f"{path} is not a saved image set: {sorted(missing)} missing")
    features, mu, sigma = arrays.pop("features"), arrays.pop("mu"), arrays.pop("sigma")
    labels, logits, count = arrays.pop("labels", None), arrays.pop("logits", None), int(arrays.pop("count"))
    f = mu.shape[0] if mu.ndim == 1 else -1
    if (f < 0 or sigma.shape != (f, f) or features.ndim != 2 or features.shape[1] != f or count != len(features)
            or (labels is not None and labels.shape != (count,))
            or (logits is not None and (logits.ndim != 2 or len(logits) != count))):
        raise ValueError(f"{path}: shapes do not fit together: mu {mu.shape}, sigma {sigma.shape}, features "
                         f"{features.shape}, labels {None if labels is None else labels.shape}, logits "
                         f"{None if logits is None else logits.shape}, count {count}")
    stats = FeatureStats(mu, sigma, count, str(arrays.pop("description")))
    return ImageSet(stats, features, labels, str(arrays.pop("set_description")), logits), arrays

"""Nearest neighbours in Inception feature space: precision / recall, and class consistency.

Precision and recall (Kynkäänniemi et al., 2019, "Improved precision and recall metric"): each set's
manifold is the union of balls around its points, of radius the distance to the point's k-th nearest
neighbour in its own set (k = 3; the point itself, at distance 0, is not counted). Precision is the
fraction of generated samples inside the real manifold (are the samples realistic?), recall the fraction
of real images inside the generated manifold (is the real variety covered?). Distances are Euclidean on
the 2048 pool features, compared with <=, as in the authors' code and ADM's evaluator.

Class consistency: the fraction of class-conditional samples whose nearest reference image carries the
sample's label. On a toy chain where every training photo is its own class it says whether the GPT
follows its label; chance is 1 / classes.

Distances are computed on the default device in row chunks [chunk, N] (the last chunk padded, so one
program serves every chunk): 50,000 x 50,000 never exists whole. float32 with exact (HIGHEST) matmuls;
the squared distances come from |a|^2 - 2 a.b + |b|^2, clipped at 0.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

NEAREST_K = 3
CHUNK = 1000


def squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """a: [n, F], b: [m, F] -> [n, m] squared Euclidean distances."""
    cross = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(jnp.sum(a * a, 1)[:, None] - 2.0 * cross + jnp.sum(b * b, 1)[None, :], 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_distance(rows, points, *, k):
    return -jax.lax.top_k(-squared_distances(rows, points), k + 1)[0][:, k]


@jax.jit
def _inside(rows, points, radii):
    return jnp.any(squared_distances(rows, points) <= radii[None, :], axis=1)


@jax.jit
def _nearest(rows, points):
    return jnp.argmin(squared_distances(rows, points), axis=1)


def _by_chunks(fn: Callable[[jax.Array], jax.Array], rows: np.ndarray, chunk: int) -> np.ndarray:
    """fn over rows [N, F] in chunks of `chunk` rows -> [N, ...]; the last chunk is zero-padded."""
    chunk = min(chunk, len(rows))
    out = []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        padded = np.pad(part, ((0, chunk - len(part)), (0, 0)))
        out.append(np.asarray(fn(jnp.asarray(padded)))[:len(part)])
    return np.concatenate(out)


def _as_features(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or not len(x):
        raise ValueError(f"{name} must be features [N, F] with N > 0, got shape {x.shape}")
    return x


def knn_radii(features, k: int = NEAREST_K, chunk: int = CHUNK) -> np.ndarray:
    """features [N, F] -> [N] squared distance of each point to its k-th nearest other point."""
    features = _as_features(features, "features")
    if len(features) <= k:
        raise ValueError(f"the k = {k} nearest neighbours need more than {k} points, got {len(features)}")
    points = jnp.asarray(features)
    return _by_chunks(lambda rows: _kth_distance(rows, points, k=k), features, chunk)


def coverage(queries, points, radii, chunk: int = CHUNK) -> float:
    """Fraction of queries [n, F] within the ball of at least one point [N, F] (squared radii [N])."""
    queries, points = _as_features(queries, "queries"), jnp.asarray(_as_features(points, "points"))
    radii = jnp.asarray(radii, jnp.float32)
    return float(np.mean(_by_chunks(lambda rows: _inside(rows, points, radii), queries, chunk)))


def precision_recall(real, fake, k: int = NEAREST_K, chunk: int = CHUNK) -> tuple[float, float]:
    """(precision, recall) of generated features `fake` [n, F] against real features [N, F]."""
    precision = coverage(fake, real, knn_radii(real, k, chunk), chunk)
    recall = coverage(real, fake, knn_radii(fake, k, chunk), chunk)
    return precision, recall


def nearest_labels(queries, points, labels, chunk: int = CHUNK) -> np.ndarray:
    """The label [n] of each query's nearest point; queries [n, F], points [N, F], labels [N]."""
    queries, points = _as_features(queries, "queries"), jnp.asarray(_as_features(points, "points"))
    nearest = _by_chunks(lambda rows: _nearest(rows, points), queries, chunk)
    return np.asarray(labels)[nearest]


def class_consistency(features, labels, reference, reference_labels, chunk: int = CHUNK) -> dict[str, float]:
    """How often a sample's nearest reference image has the sample's label.

    features [n, F] and labels [n] of the samples; reference [N, F] and reference_labels [N]. Samples of a
    class absent from the reference (a class the GPT had no image of) cannot match and are left out; the
    result says how many were counted. chance = 1 / the reference's classes.
    """
    labels, reference_labels = np.asarray(labels), np.asarray(reference_labels)
    counted = np.isin(labels, reference_labels)
    if not counted.any():
        raise ValueError(f"no sample has a label of the reference (sample labels {np.unique(labels)[:10]}, "
                         f"reference labels {np.unique(reference_labels)[:10]})")
    found = nearest_labels(np.asarray(features)[counted], reference, reference_labels, chunk)
    classes = len(np.unique(reference_labels))
    return dict(class_consistency=float(np.mean(found == labels[counted])), chance=1.0 / classes,
                classes=classes, counted=int(counted.sum()))

"""Codebook usage and health over an eval set: usage alone can read 100% with degenerate codes.

- usage, dead codes, perplexity: from `fvq_jax.quantizers.usage.UsageCounter` (exact union);
- effective rank of the searched (bridged) code vectors, after centring them on their mean (the
  spread of the codes, not their offset): Roy & Vetterli's exp(entropy of the normalised singular
  values), 1 .. min(K, D), plus the number of singular values holding 99% of the energy
  (squared singular values). A codebook that collapsed onto a few directions shows it here
  whatever its usage;
- near-duplicate codes: codes whose nearest other code lies closer than `relative` (default 1%)
  of the median nearest-neighbour distance, or than an absolute distance;
- for VQBridge, usage by in-patch position: the bridge maps each p x p patch of the codebook grid
  with one head, so the codes at one position (row % p, col % p) share one row-group of the head's
  weights. Usage that stops short of 100% usually shows here as whole positions left unused.
The nearest-neighbour search is tiled (queries in chunks, codes in tiles; memory O(chunk x tile)),
so K = 262,144 never builds a K x K matrix. It ranks candidates by ||a||^2 + ||b||^2 - 2 a.b (a
matmul), then measures the distance to the winner directly as ||a - b||, so exact duplicates
read 0 rather than float32 cancellation noise. (Candidates within ~1e-3 ||a|| of each other are
not ranked reliably, so a near-duplicate may report a slightly farther near-duplicate; it stays
far below any sensible threshold.)
The singular values come from the D x D Gram matrix of the centred codes, formed in float64 on
the host (float32 would put sqrt(eps) ~ 3e-4 of the largest singular value on every zero one).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fvq_jax.evaluation.host import to_host
from fvq_jax.quantizers import ops
from fvq_jax.quantizers.usage import UsageCounter


def singular_values(codes, *, center: bool = True) -> np.ndarray:
    """codes: [K, D] -> singular values [D] float64, descending, via the float64 D x D Gram matrix."""
    x = to_host(codes).astype(np.float64)
    if center:
        x = x - x.mean(axis=0)
    eigenvalues = np.clip(np.linalg.eigvalsh(x.T @ x), 0.0, None)
    return np.sqrt(eigenvalues)[::-1]


def effective_rank(s: np.ndarray) -> float:
    """Roy & Vetterli (2007): exp(-sum p log p), p = s / sum(s); 0 for an all-zero matrix."""
    s = np.asarray(s, np.float64)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def energy_rank(s: np.ndarray, energy: float = 0.99) -> int:
    """How many of the largest singular values hold `energy` of sum(s^2); 0 for all-zero."""
    power = np.sort(np.asarray(s, np.float64))[::-1] ** 2
    total = power.sum()
    if total <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(power) / total, energy) + 1)


@functools.partial(jax.jit, static_argnames=("tile_size", "query_chunk"))
def nearest_neighbour_distances(codes: jax.Array, *, tile_size: int = 4096, query_chunk: int = 4096) -> jax.Array:
    """codes: [K, D] -> [K] float32 Euclidean distance from each code to its nearest *other* code."""
    codes = jnp.asarray(codes, jnp.float32)
    num_codes, dim = codes.shape
    if num_codes < 2:
        raise ValueError(f"nearest-neighbour distances need at least 2 codes, got {num_codes}")
    tile, chunk = min(tile_size, num_codes), min(query_chunk, num_codes)
    num_tiles, num_chunks = math.ceil(num_codes / tile), math.ceil(num_codes / chunk)
    tiles = jnp.pad(codes, ((0, num_tiles * tile - num_codes), (0, 0))).reshape(num_tiles, tile, dim)
    offsets = jnp.arange(num_tiles, dtype=jnp.int32) * tile
    queries = jnp.pad(codes, ((0, num_chunks * chunk - num_codes), (0, 0))).reshape(num_chunks, chunk, dim)
    query_ids = jnp.arange(num_chunks * chunk, dtype=jnp.int32).reshape(num_chunks, chunk)

    def search(args):
        q, q_ids = args

        def scan_tile(carry, tile_args):
            best_d, best_i = carry
            codes_tile, offset = tile_args
            ids = offset + jnp.arange(tile, dtype=jnp.int32)
            d = ops.squared_distances(q, codes_tile, "fp32")
            # Exclude each code itself and the padding rows of the last tile.
            d = jnp.where((ids[None, :] == q_ids[:, None]) | (ids[None, :] >= num_codes), jnp.inf, d)
            i = jnp.argmin(d, axis=-1)
            m = jnp.take_along_axis(d, i[:, None], axis=-1)[:, 0]
            better = m < best_d
            return (jnp.where(better, m, best_d), jnp.where(better, ids[i], best_i)), None

        init = (jnp.full((chunk,), jnp.inf, jnp.float32), jnp.zeros((chunk,), jnp.int32))
        (_, best_i), _ = jax.lax.scan(scan_tile, init, (tiles, offsets))
        return best_i

    nearest = jax.lax.map(search, (queries, query_ids)).reshape(-1)[:num_codes]
    return jnp.linalg.norm(codes - codes[nearest], axis=-1)


def near_duplicate_threshold(nn_distances: np.ndarray, *, relative: float = 0.01,
                             absolute: float | None = None) -> float:
    """`absolute` when given, else `relative` x the median nearest-neighbour distance."""
    return float(absolute) if absolute is not None else relative * float(np.median(nn_distances))


def codebook_health(codes: jax.Array, *, relative: float = 0.01, absolute: float | None = None,
                    energy: float = 0.99, tile_size: int = 4096, query_chunk: int = 4096) -> dict[str, float]:
    """Effective rank and near duplicates of the searched codebook codes: [K, D].

    Returns effective_rank, energy_rank (singular values for `energy`), near_duplicates (codes
    whose nearest other code is within the threshold), duplicate_threshold, and the min / median
    nearest-neighbour distances.
    """
    s = singular_values(codes)
    nn = to_host(nearest_neighbour_distances(codes, tile_size=tile_size, query_chunk=query_chunk))
    threshold = near_duplicate_threshold(nn, relative=relative, absolute=absolute)
    return {
        "effective_rank": effective_rank(s),
        "energy_rank": energy_rank(s, energy),
        "near_duplicates": int(np.sum(nn <= threshold)),
        "duplicate_threshold": threshold,
        "nn_distance_min": float(nn.min()),
        "nn_distance_median": float(np.median(nn)),
    }


def bridge_position_usage(counts, patch: int) -> np.ndarray:
    """counts: [K] uses per code of a VQBridge codebook with patch p -> [p, p] fraction of the codes
    at each in-patch position (row % p, col % p) of the sqrt(K) x sqrt(K) grid that were used."""
    counts = np.asarray(counts)
    side = math.isqrt(counts.size)
    if side * side != counts.size or side % patch:
        raise ValueError(f"{counts.size} codes do not form a square grid of {patch} x {patch} patches")
    used = (counts > 0).reshape(side // patch, patch, side // patch, patch)
    return used.mean(axis=(0, 2))


def bridge_position_summary(counts, patch: int) -> dict[str, float]:
    """How many of the p^2 in-patch positions have any code in use, and the least / most used."""
    per_position = bridge_position_usage(counts, patch)
    return {"bridge_positions_used": int(np.sum(per_position > 0)),
            "bridge_positions": int(per_position.size),
            "bridge_position_usage_min": float(per_position.min()),
            "bridge_position_usage_max": float(per_position.max())}


def usage_summary(counter: UsageCounter) -> dict[str, float]:
    """Exact usage over the eval set: fraction used, used / dead codes, perplexity, assignments."""
    return {
        "usage": counter.usage,
        "used_codes": counter.num_codes - counter.dead_codes,
        "dead_codes": counter.dead_codes,
        "perplexity": counter.perplexity,
        "assignments": counter.total,
    }

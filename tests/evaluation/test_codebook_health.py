"""Codebook health against numpy on planted cases: duplicates, low rank, usage."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from fvq_jax.evaluation import codebook_health as health
from fvq_jax.quantizers.usage import UsageCounter


def planted_duplicates(seed=0):
    rng = np.random.default_rng(seed)
    codes = rng.normal(size=(300, 16)).astype(np.float32)
    # Near copies of code 4, ~0.5% of the median neighbour distance away: far enough apart that
    # float32 ranking resolves them (see the module docstring).
    codes[5] = codes[4] + 3e-3 * rng.normal(size=16)
    codes[6] = codes[4] + 4e-3 * rng.normal(size=16)
    codes[250] = codes[7]  # an exact copy
    return codes, {4, 5, 6, 7, 250}


def test_nearest_neighbour_distances_match_numpy():
    codes, _ = planted_duplicates()
    d = cdist(codes.astype(np.float64), codes.astype(np.float64))
    np.fill_diagonal(d, np.inf)
    ref = d.min(axis=1)
    # Tiles and chunks that do not divide K = 300, so padding and self-exclusion are both exercised.
    ours = np.asarray(health.nearest_neighbour_distances(jnp.asarray(codes), tile_size=64, query_chunk=70))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert ours[7] == 0.0 and ours[250] == 0.0
    untiled = np.asarray(health.nearest_neighbour_distances(jnp.asarray(codes), tile_size=1024, query_chunk=1024))
    np.testing.assert_array_equal(untiled, ours)


def test_planted_near_duplicates_are_counted():
    codes, planted = planted_duplicates()
    report = health.codebook_health(jnp.asarray(codes), tile_size=64, query_chunk=64)
    assert report["near_duplicates"] == len(planted)
    assert report["nn_distance_min"] == 0.0
    clean = np.delete(codes, sorted(planted - {4}), axis=0)
    assert health.codebook_health(jnp.asarray(clean))["near_duplicates"] == 0
    # An absolute threshold above every distance marks every code.
    assert health.codebook_health(jnp.asarray(codes), absolute=1e9)["near_duplicates"] == len(codes)


def numpy_effective_rank(codes):
    s = np.linalg.svd(codes - codes.mean(0), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return np.exp(-np.sum(p * np.log(p))), s


def test_rank_deficient_codebook():
    rng = np.random.default_rng(1)
    codes = (rng.normal(size=(500, 3)) @ rng.normal(size=(3, 32)) + rng.normal(size=32)).astype(np.float32)
    report = health.codebook_health(jnp.asarray(codes))
    ref_erank, s = numpy_effective_rank(codes.astype(np.float64))
    assert report["energy_rank"] <= 3
    # Singular values of a rank-3 matrix: three real ones, the rest round-off.
    assert report["effective_rank"] == pytest.approx(ref_erank, rel=1e-3) and report["effective_rank"] < 3.0
    energy = np.cumsum(s ** 2) / np.sum(s ** 2)
    assert report["energy_rank"] == int(np.argmax(energy >= 0.99) + 1)


def test_isotropic_codebook_has_full_rank():
    codes = np.random.default_rng(2).normal(size=(4000, 8))
    erank = health.effective_rank(health.singular_values(jnp.asarray(codes, jnp.float32)))
    assert erank == pytest.approx(numpy_effective_rank(codes)[0], rel=1e-4) and erank > 7.8
    assert health.energy_rank(health.singular_values(jnp.asarray(codes, jnp.float32))) == 8


def test_rank_closed_forms():
    assert health.effective_rank(np.array([2.0, 2.0, 2.0, 2.0])) == pytest.approx(4.0)
    assert health.effective_rank(np.array([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert health.effective_rank(np.zeros(3)) == 0.0
    # Energies 0.81, 0.18, 0.01 (of 1.0): 0.99 needs two values, 0.995 three.
    s = np.sqrt([0.81, 0.18, 0.01])
    assert health.energy_rank(s, 0.99) == 2 and health.energy_rank(s, 0.995) == 3


def test_usage_summary():
    counter = UsageCounter(8)
    counter.update(np.array([[0, 0, 1], [1, 2, 2]]))
    summary = health.usage_summary(counter)
    assert summary["usage"] == 3 / 8 and summary["used_codes"] == 3 and summary["dead_codes"] == 5
    assert summary["assignments"] == 6 and summary["perplexity"] == pytest.approx(3.0)


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_bridge_position_usage_against_a_loop_over_the_grid(patch):
    side, rng = 16, np.random.default_rng(patch)
    counts = rng.integers(0, 3, size=side * side) * (rng.random(side * side) < 0.3)
    used, total = np.zeros((patch, patch)), np.zeros((patch, patch))
    for n, c in enumerate(counts):  # code n is grid cell (n // side, n % side)
        position = ((n // side) % patch, (n % side) % patch)
        total[position] += 1
        used[position] += c > 0
    np.testing.assert_array_equal(health.bridge_position_usage(counts, patch), used / total)
    summary = health.bridge_position_summary(counts, patch)
    assert summary["bridge_positions"] == patch * patch
    assert summary["bridge_positions_used"] == np.count_nonzero(used)
    assert summary["bridge_position_usage_min"] == (used / total).min()


def test_bridge_position_usage_sees_a_single_position_in_use():
    side, patch = 8, 4
    counts = np.zeros(side * side, int)
    counts[[0, 4, 32, 36]] = 5  # all at in-patch position (0, 0)
    summary = health.bridge_position_summary(counts, patch)
    assert summary["bridge_positions_used"] == 1 and summary["bridge_position_usage_max"] == 1.0
    with pytest.raises(ValueError, match="3 x 3 patches"):
        health.bridge_position_usage(counts, 3)

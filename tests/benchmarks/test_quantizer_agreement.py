"""bf16-vs-fp32 bridge agreement (benchmarks/quantizer.py): the flip fraction and how far from a tie flips are."""

import argparse

import jax.numpy as jnp
import numpy as np

from fvq_jax.benchmarks.quantizer import compare_indices

ARGS = argparse.Namespace(precision="fp32", tile=8)  # two tiles of 8 codes


def test_compare_indices_counts_flips_and_their_distance_excess():
    rng = np.random.default_rng(0)
    codes = rng.normal(size=(16, 4)).astype(np.float32)
    z = codes[:6] + 0.01 * rng.normal(size=(6, 4)).astype(np.float32)  # token i is nearest to code i
    moved = codes.copy()
    moved[2] = codes[2] + 100.0  # the "bf16" codebook loses code 2: token 2 goes elsewhere
    out = compare_indices(jnp.asarray(z), {"fp32": jnp.asarray(codes), "bf16": jnp.asarray(moved)}, ARGS)

    d = ((z[:, None] - codes[None]) ** 2).sum(-1)  # by the fp32 codes
    other = np.argmin(np.where(np.arange(16) == 2, np.inf, d[2]))
    assert out["fraction_differing"] == 1 / 6
    np.testing.assert_allclose(out["excess_distance_max"], (d[2, other] - d[2, 2]) / d[2, 2], rtol=1e-5)
    np.testing.assert_allclose(out["codes_relative_error"], np.linalg.norm(moved - codes) / np.linalg.norm(codes),
                               rtol=1e-6)


def test_identical_codebooks_agree():
    codes = jnp.asarray(np.random.default_rng(1).normal(size=(32, 8)), jnp.float32)
    z = jnp.asarray(np.random.default_rng(2).normal(size=(10, 8)), jnp.float32)
    out = compare_indices(z, {"fp32": codes, "bf16": codes}, ARGS)
    assert out["fraction_differing"] == 0.0 and out["excess_distance_max"] == 0.0

"""The near-tie tolerant index comparison used by the export tests."""

import numpy as np
import pytest

from tests.nearest_codes import assert_same_codes


def test_accepts_flips_between_near_duplicate_codes_only():
    rng = np.random.default_rng(0)
    codebook = rng.normal(size=(16, 4)).astype(np.float32)
    codebook[9] = codebook[3] + 1e-8  # a near-duplicate pair
    z = codebook[[3, 5, 7, 3]] + 1e-3 * rng.normal(size=(4, 4))
    expected = np.array([3, 5, 7, 3])
    assert assert_same_codes(expected, expected, z, codebook) == 0
    assert assert_same_codes(np.array([9, 5, 7, 3]), expected, z, codebook) == 1  # a near-tie flipped
    with pytest.raises(AssertionError, match="not a nearest code for 1 tokens, e.g. token 1"):
        assert_same_codes(np.array([3, 6, 7, 3]), expected, z, codebook)  # a clear choice differs
    with pytest.raises(AssertionError, match="expected index is not a nearest code"):
        assert_same_codes(expected, np.array([3, 5, 7, 0]), z, codebook)

"""Comparing nearest-code indices computed along two float paths (e.g. bridged vs baked codebook).

Two paths that reach the same codebook through differently fused float32 arithmetic (XLA fuses
differently per CPU: AVX-512 vs AVX2 vs SSE) agree to a few ulps, so a token that is equidistant
from two codes up to that rounding may pick either. Such near-ties are real in these tests: a
random lin/5 projector's ReLUs map many raw codes to nearly the same output (codes 52 and 8 of the
export test differ by 2e-8), and a freshly trained bridge starts from all-equal codes.

`assert_same_codes` therefore demands equality where the choice is clear, and accepts a difference
only where both chosen codes are within float32 rounding of the true nearest distance (float64).
"""

from __future__ import annotations

import numpy as np

# Relative to the size of the terms in ||z||^2 + ||e||^2 - 2 z.e: float32 rounding of those sums is
# ~1e-7 of that scale; 1e-5 leaves room for D-term reductions, yet is far below real gaps (~1e-2).
TIE_RTOL = 1e-5


def distances64(z: np.ndarray, codebook: np.ndarray, *, l2_norm: bool = False) -> np.ndarray:
    """[N, K] squared distances in float64 (after unit-normalising both sides when l2_norm)."""
    z = np.asarray(z, np.float64).reshape(-1, np.shape(codebook)[-1])
    codebook = np.asarray(codebook, np.float64)
    if l2_norm:
        z = z / np.linalg.norm(z, axis=-1, keepdims=True)
        codebook = codebook / np.linalg.norm(codebook, axis=-1, keepdims=True)
    return ((z[:, None, :] - codebook[None]) ** 2).sum(-1)


def assert_same_codes(actual, expected, z, codebook, *, l2_norm: bool = False, rtol: float = TIE_RTOL) -> int:
    """Assert that indices `actual` and `expected` (same shape, one index per token of z [..., D]) agree
    except on near-ties of `codebook` [K, D]; returns how many near-ties flipped.

    Both indices of every token must be nearest codes up to rtol x (||z||^2 + mean ||e||^2) (float64),
    so tokens whose best and second-best codes are further apart than that agree exactly.
    """
    actual, expected = np.asarray(actual).reshape(-1), np.asarray(expected).reshape(-1)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    d = distances64(z, codebook, l2_norm=l2_norm)
    assert d.shape[0] == actual.size, f"{actual.size} indices for {d.shape[0]} tokens"
    zz = np.asarray(z, np.float64).reshape(d.shape[0], -1)
    scale = 2.0 if l2_norm else (zz ** 2).sum(-1) + (np.asarray(codebook, np.float64) ** 2).sum(-1).mean()
    tol = rtol * np.broadcast_to(scale, (d.shape[0],))
    rows = np.arange(d.shape[0])
    best = d.min(-1)
    for name, idx in (("actual", actual), ("expected", expected)):
        excess = d[rows, idx] - best
        bad = np.flatnonzero(excess > tol)
        assert not bad.size, (f"{name} index is not a nearest code for {bad.size} tokens, e.g. token {bad[0]}: "
                              f"code {idx[bad[0]]} is {excess[bad[0]]:.3g} further than the nearest (tol {tol[bad[0]]:.3g})")
    return int(np.count_nonzero(actual != expected))


def assert_same_quantizer_codes(quantizer, z, actual, expected) -> int:
    """`assert_same_codes` for every level of any quantizer type (vq, ema, residual, multiscale).

    quantizer: the module whose codebook() both paths searched (e.g. the bridged one); z: its input
    [B, h, w, D]; actual / expected: index arrays as its __call__ returns them. Each level's tokens
    are replayed in float32 along the `expected` path, so a flip at one level is judged on the
    tokens the next level really saw up to rounding. Returns the number of flipped near-ties.
    """
    from fvq_jax.quantizers.multiscale import MultiScaleQuantizer, split_scales
    from fvq_jax.quantizers.residual import Level, ResidualQuantizer

    codebook = np.asarray(quantizer.codebook())
    if isinstance(quantizer, ResidualQuantizer):
        levels = [Level()] * quantizer.depth
        split = lambda idx: [np.asarray(idx)[..., k] for k in range(quantizer.depth)]  # noqa: E731
    elif isinstance(quantizer, MultiScaleQuantizer):
        levels = quantizer.levels()
        split = lambda idx: [np.asarray(i) for i in split_scales(idx, quantizer.scales)]  # noqa: E731
    else:
        return assert_same_codes(actual, expected, z, codebook, l2_norm=quantizer.l2_norm)
    flipped, residual = 0, z
    for level, got, want in zip(levels, split(actual), split(expected)):
        tokens = level.to_tokens(residual)
        flipped += assert_same_codes(got, want, tokens, codebook)
        residual = residual - level.to_grid(codebook[want])
    return flipped

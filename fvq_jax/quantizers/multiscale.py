"""VAR-style multi-scale residual quantizer over one (bridged) codebook.

For each scale s (the last one is the token grid G): area-downsample the residual to s x s,
quantize it (float32), bicubic-upsample the code map back to G x G, refine it with
phi(x) = (1 - r) x + r conv3x3(x) (r = 0.5), add it to f_hat and subtract it from the residual.
The last scale is neither resized down nor up. Four phi convs are shared among the scales by
their relative position (`phi_index`). Losses are averaged over scales on the partial sums
(`residual.quantize_levels`).

Indices are one flat int32 array [B, sum(s^2)]: the scales' s x s maps, row-major, coarsest
first (VAR's token order); `split_scales` / `join_scales` convert to and from per-scale maps.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fvq_jax.nn import conv
from fvq_jax.quantizers.residual import Level, quantize_levels, sum_levels
from fvq_jax.quantizers.vq import SearchOptions, VectorQuantizer

VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def check_scales(scales: Sequence[int], token_grid: int | None = None) -> None:
    """ValueError unless `scales` is a strictly increasing tuple of positive ints ending at the grid."""
    scales = tuple(scales)
    if not scales or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive ints, got {scales!r}")
    if any(a >= b for a, b in zip(scales, scales[1:])):
        raise ValueError(f"scales must be strictly increasing, got {scales!r}")
    if token_grid is not None and scales[-1] != token_grid:
        raise ValueError(f"the last scale must equal the {token_grid} x {token_grid} token grid, got scales {scales!r}")


def area_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] averaging weights of 1-D area resampling (PyTorch 'area' / adaptive
    average pooling): output i averages inputs floor(i n / m) .. ceil((i + 1) n / m) - 1."""
    weights = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        start = (i * size_in) // size_out
        stop = -((-(i + 1) * size_in) // size_out)
        weights[i, start:stop] = 1.0 / (stop - start)
    return weights


def area_downsample(x: jax.Array, size: int) -> jax.Array:
    """x: [B, H, W, D] -> [B, size, size, D], each output the mean of its (possibly overlapping) box."""
    rows = jnp.asarray(area_matrix(x.shape[1], size))
    cols = jnp.asarray(area_matrix(x.shape[2], size))
    return jnp.einsum("ih,jw,bhwd->bijd", rows, cols, x, precision=jax.lax.Precision.HIGHEST)


def bicubic_upsample(x: jax.Array, size: int) -> jax.Array:
    """x: [B, s, s, D] -> [B, size, size, D] (jax.image.resize, Keys cubic a = -0.5)."""
    return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), method="bicubic")


def phi_index(k: int, num_scales: int, num_phi: int) -> int:
    """Which of `num_phi` shared convs refines scale k of `num_scales`.

    Scale k sits at t = k / (num_scales - 1) in [0, 1]; the convs sit at num_phi evenly spaced
    ticks from 1 / (3 num_phi) to 1 - 1 / (3 num_phi); the nearest tick wins, an exact tie goes to
    the later conv. Integer arithmetic (everything times 3 P (P - 1) (n - 1)) keeps ties exact;
    for P = 4 this reproduces VAR's float choice, e.g. 10 scales -> 0 0 1 1 1 2 2 3 3 3.
    """
    if num_phi == 1 or num_scales == 1:
        return 0
    p, n = num_phi, num_scales - 1
    position = 3 * p * (p - 1) * k
    return min(range(p), key=lambda j: (abs(position - n * ((p - 1) + j * (3 * p - 2))), -j))


class Phi(nnx.Module):
    """phi(x) = (1 - ratio) x + ratio conv3x3(x), in float32."""

    def __init__(self, code_dim: int, ratio: float, *, rngs: nnx.Rngs):
        self.ratio = ratio
        self.conv = conv(code_dim, code_dim, 3, dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, G, G, D] -> [B, G, G, D]."""
        return (1.0 - self.ratio) * x + self.ratio * self.conv(x)


def split_scales(indices: jax.Array, scales: Sequence[int]) -> list[jax.Array]:
    """Flat indices [B, sum(s^2)] -> one [B, s, s] map per scale."""
    expected = sum(s * s for s in scales)
    if indices.shape[-1] != expected:
        raise ValueError(f"multi-scale indices must be [B, {expected}] for scales {tuple(scales)}, got {indices.shape}")
    bounds = np.cumsum([s * s for s in scales])[:-1].tolist()
    return [part.reshape(indices.shape[0], s, s) for part, s in zip(jnp.split(indices, bounds, axis=-1), scales)]


def join_scales(maps: Sequence[jax.Array]) -> jax.Array:
    """One [B, s, s] map per scale -> flat indices [B, sum(s^2)]."""
    return jnp.concatenate([m.reshape(m.shape[0], -1) for m in maps], axis=-1)


class MultiScaleQuantizer(VectorQuantizer):
    """VAR's multi-scale residual quantizer with a bridged codebook; tokens [B, G, G, D], G = scales[-1]."""

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        *,
        scales: Sequence[int] = VAR_SCALES,
        num_phi: int = 4,
        phi_ratio: float = 0.5,
        projector: str = "L/4",
        beta: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
        search: SearchOptions = SearchOptions(),
        usage_window: int | None = None,
        bridge_chunks: int = 1,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_scales(scales)
        if num_phi < 1:
            raise ValueError(f"num_phi must be >= 1, got {num_phi}")
        super().__init__(codebook_size, code_dim, projector=projector, beta=beta, entropy_weight=entropy_weight,
                         entropy_temperature=entropy_temperature, search=search, usage_window=usage_window,
                         bridge_chunks=bridge_chunks, dtype=dtype, rngs=rngs)
        self.scales = tuple(scales)
        self.phis = nnx.List([Phi(code_dim, phi_ratio, rngs=rngs) for _ in range(num_phi)])

    def levels(self) -> list[Level]:
        """Per scale: area-downsample the residual; bicubic-upsample the codes and apply its phi."""
        grid, n = self.scales[-1], len(self.scales)

        def level(k, s):
            phi = self.phis[phi_index(k, n, len(self.phis))]
            if s == grid:
                return Level(to_grid=phi)
            return Level(to_tokens=lambda r: area_downsample(r, s), to_grid=lambda c: phi(bicubic_upsample(c, grid)))

        return [level(k, s) for k, s in enumerate(self.scales)]

    def __call__(self, z: jax.Array, *, train: bool = False) -> dict:
        """z: [B, G, G, D] -> dict as `residual.quantize_levels`, indices flat [B, sum(s^2)]."""
        grid = self.scales[-1]
        if z.ndim != 4 or z.shape[1:3] != (grid, grid):
            raise ValueError(f"multi-scale quantizer with scales {self.scales} needs tokens [B, {grid}, {grid}, D], "
                             f"got {z.shape}: the last scale must equal the token grid")
        out = quantize_levels(z, self.codebook(None), self.levels(), beta=self.beta, entropy_weight=self.entropy_weight,
                              entropy_temperature=self.entropy_temperature, search=self.search)
        out["indices"] = join_scales(out["indices"])
        if train:
            out["usage"] = self.track_usage(out["indices"])
        return out

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Flat indices [B, sum(s^2)] -> f_hat [B, G, G, D], the forward's z_q value."""
        return sum_levels(self.codebook(), split_scales(indices, self.scales), self.levels())

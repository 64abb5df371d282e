"""Building blocks shared by the VQ-GAN encoder and decoder (LlamaGen / taming layout), NHWC."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fvq_jax.nn import conv


def group_norm(channels: int, groups: int, *, dtype, rngs) -> nnx.GroupNorm:
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible by norm_groups={groups}")
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-6, dtype=dtype, rngs=rngs)


class ResnetBlock(nnx.Module):
    """norm-swish-conv3x3-norm-swish-conv3x3 plus a (1x1-projected) shortcut.

    The reference tokenizers train without dropout, so there is none.
    """

    def __init__(self, in_ch: int, out_ch: int, *, norm_groups: int = 32, dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm1 = group_norm(in_ch, norm_groups, dtype=dtype, rngs=rngs)
        self.conv1 = conv(in_ch, out_ch, 3, dtype=dtype, rngs=rngs)
        self.norm2 = group_norm(out_ch, norm_groups, dtype=dtype, rngs=rngs)
        self.conv2 = conv(out_ch, out_ch, 3, dtype=dtype, rngs=rngs)
        self.shortcut = conv(in_ch, out_ch, 1, dtype=dtype, rngs=rngs) if in_ch != out_ch else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, in_ch] -> [B, H, W, out_ch]."""
        h = self.conv1(nnx.swish(self.norm1(x)))
        h = self.conv2(nnx.swish(self.norm2(h)))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all H*W positions, 1x1-conv q/k/v/out, residual."""

    def __init__(self, channels: int, *, norm_groups: int = 32, dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm = group_norm(channels, norm_groups, dtype=dtype, rngs=rngs)
        self.q = conv(channels, channels, 1, dtype=dtype, rngs=rngs)
        self.k = conv(channels, channels, 1, dtype=dtype, rngs=rngs)
        self.v = conv(channels, channels, 1, dtype=dtype, rngs=rngs)
        self.proj_out = conv(channels, channels, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        b, h, w, c = x.shape
        y = self.norm(x)
        q, k, v = (f(y).reshape(b, h * w, 1, c) for f in (self.q, self.k, self.v))
        y = jax.nn.dot_product_attention(q, k, v).reshape(b, h, w, c)
        return x + self.proj_out(y)


class Downsample(nnx.Module):
    """Pad right/bottom by one, then a 3x3 stride-2 conv: H, W -> H/2, W/2."""

    def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, stride=2, padding="VALID", dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv: H, W -> 2H, 2W."""

    def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))

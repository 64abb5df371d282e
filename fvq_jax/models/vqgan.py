"""The VQ-GAN tokenizer (LlamaGen VQ-8 / VQ-16 layout): encoder, quantizer, decoder. NHWC.

Images are [B, H, W, 3] in [-1, 1]; a VQ-16 turns a 256 x 256 image into 16 x 16 codes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.models.layers import AttnBlock, Downsample, ResnetBlock, Upsample, conv, group_norm


@dataclasses.dataclass(frozen=True)
class VQGANArch(config_lib.Spec):
    """Encoder/decoder shape, the config's `model` block (`preset` there only names where the fields came
    from). len(ch_mult) - 1 downsamplings: the token grid is res / 2**(len-1)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    enc_blocks: int = 2
    dec_blocks: int = 3
    z_channels: int = 256
    norm_groups: int = 32

    def __post_init__(self):
        for name in ("ch", "enc_blocks", "dec_blocks", "z_channels", "norm_groups"):
            config_lib.require_number(getattr(self, name), name, integer=True)
        mult = tuple(self.ch_mult) if isinstance(self.ch_mult, (tuple, list)) else self.ch_mult
        config_lib.require(isinstance(mult, tuple) and len(mult) >= 1 and all(
            isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in mult), "ch_mult",
            f"must be a non-empty tuple of positive ints, got {mult!r}")
        object.__setattr__(self, "ch_mult", mult)
        for width in sorted({self.ch * m for m in mult} | {self.z_channels}):
            config_lib.require(width % self.norm_groups == 0, "norm_groups",
                               f"{self.norm_groups} groups do not divide a layer's {width} channels")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


VQGAN_PRESETS = {
    "VQ-8": VQGANArch(ch_mult=(1, 2, 2, 4)),
    "VQ-16": VQGANArch(ch_mult=(1, 1, 2, 2, 4)),
    "VQ-32": VQGANArch(ch_mult=(1, 1, 2, 2, 2, 4)),
}


class Encoder(nnx.Module):
    """conv_in; per level `blocks` ResnetBlocks (+ attention at the lowest level), downsample
    between levels; middle Res-Attn-Res; norm, swish, conv_out to z_channels."""

    def __init__(self, arch: VQGANArch, *, in_channels: int = 3, dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(norm_groups=arch.norm_groups, dtype=dtype, rngs=rngs)
        self.conv_in = conv(in_channels, arch.ch, 3, dtype=dtype, rngs=rngs)
        levels, ch_in = [], arch.ch
        last = len(arch.ch_mult) - 1
        for i, mult in enumerate(arch.ch_mult):
            ch_out = arch.ch * mult
            res, attn = [], []
            for _ in range(arch.enc_blocks):
                res.append(ResnetBlock(ch_in, ch_out, **kw))
                ch_in = ch_out
                if i == last:
                    attn.append(AttnBlock(ch_in, **kw))
            levels.append(Level(res, attn, Downsample(ch_in, dtype=dtype, rngs=rngs) if i != last else None))
        self.levels = nnx.List(levels)
        self.mid = MiddleBlock(ch_in, **kw)
        self.norm_out = group_norm(ch_in, arch.norm_groups, dtype=dtype, rngs=rngs)
        self.conv_out = conv(ch_in, arch.z_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, 3] -> [B, H/f, W/f, z_channels]."""
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        return self.conv_out(nnx.swish(self.norm_out(self.mid(h))))


class Decoder(nnx.Module):
    """conv_in; middle Res-Attn-Res; per level (lowest first) `dec_blocks` ResnetBlocks
    (+ attention at the lowest level), upsample between levels; norm, swish, conv_out."""

    def __init__(self, arch: VQGANArch, *, out_channels: int = 3, dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(norm_groups=arch.norm_groups, dtype=dtype, rngs=rngs)
        ch_in = arch.ch * arch.ch_mult[-1]
        self.conv_in = conv(arch.z_channels, ch_in, 3, dtype=dtype, rngs=rngs)
        self.mid = MiddleBlock(ch_in, **kw)
        levels = []
        for i, mult in enumerate(reversed(arch.ch_mult)):
            ch_out = arch.ch * mult
            res, attn = [], []
            for _ in range(arch.dec_blocks):
                res.append(ResnetBlock(ch_in, ch_out, **kw))
                ch_in = ch_out
                if i == 0:
                    attn.append(AttnBlock(ch_in, **kw))
            last = i == len(arch.ch_mult) - 1
            levels.append(Level(res, attn, None if last else Upsample(ch_in, dtype=dtype, rngs=rngs)))
        self.levels = nnx.List(levels)
        self.norm_out = group_norm(ch_in, arch.norm_groups, dtype=dtype, rngs=rngs)
        self.conv_out = conv(ch_in, out_channels, 3, dtype=dtype, rngs=rngs)

    def features(self, z: jax.Array) -> jax.Array:
        """z: [B, h, w, z_channels] -> the input of conv_out [B, h*f, w*f, ch*ch_mult[0]]."""
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        return nnx.swish(self.norm_out(h))

    def __call__(self, z: jax.Array) -> jax.Array:
        """z: [B, h, w, z_channels] -> [B, h*f, w*f, 3]."""
        return self.conv_out(self.features(z))


class Level(nnx.Module):
    """One resolution level: ResnetBlocks, each followed by attention if `attn` is non-empty,
    then an optional resample (Downsample / Upsample)."""

    def __init__(self, res: list[ResnetBlock], attn: list[AttnBlock], resample: nnx.Module | None):
        self.res = nnx.List(res)
        self.attn = nnx.List(attn)
        self.resample = resample

    def __call__(self, h: jax.Array) -> jax.Array:
        for i, block in enumerate(self.res):
            h = block(h)
            if self.attn:
                h = self.attn[i](h)
        return h if self.resample is None else self.resample(h)


class MiddleBlock(nnx.Module):
    """ResnetBlock - AttnBlock - ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, *, norm_groups: int, dtype, rngs: nnx.Rngs):
        self.res1 = ResnetBlock(channels, channels, norm_groups=norm_groups, dtype=dtype, rngs=rngs)
        self.attn = AttnBlock(channels, norm_groups=norm_groups, dtype=dtype, rngs=rngs)
        self.res2 = ResnetBlock(channels, channels, norm_groups=norm_groups, dtype=dtype, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.res2(self.attn(self.res1(h)))


class VQGAN(nnx.Module):
    """Encoder -> 1x1 quant_conv -> quantizer -> 1x1 post_quant_conv -> decoder.

    The quantizer is any module with `__call__(z, train=) -> dict(z_q, indices, loss, ...)`,
    `lookup(indices) -> codes` and a `code_dim` attribute (vq.VectorQuantizer, the residual and
    multi-scale variants, ...). It runs in float32 (its projector in the quantizer's own compute
    dtype, `quantizer.bridge_dtype`); the convolutions run in `dtype`.
    """

    def __init__(self, arch: VQGANArch, quantizer: nnx.Module, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.arch = arch
        self.dtype = dtype
        self.encoder = Encoder(arch, dtype=dtype, rngs=rngs)
        self.quant_conv = conv(arch.z_channels, quantizer.code_dim, 1, dtype=dtype, rngs=rngs)
        self.quantizer = quantizer
        self.post_quant_conv = conv(quantizer.code_dim, arch.z_channels, 1, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(arch, dtype=dtype, rngs=rngs)

    def encode(self, images: jax.Array, *, train: bool = False):
        """images: [B, H, W, 3] -> (z_q [B, h, w, D] float32, indices [B, h, w, ...], aux dict)."""
        z = self.quant_conv(self.encoder(images.astype(self.dtype)))
        aux = self.quantizer(z, train=train)
        return aux["z_q"], aux["indices"], aux

    def decode_features(self, z_q: jax.Array) -> jax.Array:
        """z_q: [B, h, w, D] -> the input of the decoder's last conv (see `last_layer`)."""
        return self.decoder.features(self.post_quant_conv(z_q.astype(self.dtype)))

    def decode(self, z_q: jax.Array) -> jax.Array:
        """z_q: [B, h, w, D] -> images [B, H, W, 3] (float32)."""
        return self.last_layer()(self.decode_features(z_q)).astype(jnp.float32)

    def decode_codes(self, indices: jax.Array) -> jax.Array:
        """indices: [B, h, w, ...] (as returned by encode) -> images [B, H, W, 3]."""
        return self.decode(self.quantizer.lookup(indices))

    def __call__(self, images: jax.Array, *, train: bool = False):
        """images -> (reconstruction [B, H, W, 3] float32, quantizer aux dict)."""
        z_q, _, aux = self.encode(images, train=train)
        return self.decode(z_q), aux

    def last_layer(self) -> nnx.Conv:
        """The decoder's output conv (the adaptive GAN weight compares gradients at its kernel)."""
        return self.decoder.conv_out


def count_params(module: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def param_breakdown(model: VQGAN) -> dict[str, int]:
    """Parameter counts per part; `quantizer` includes the raw codebook and the projector."""
    projector = getattr(model.quantizer, "projector", None)
    return {
        "encoder": count_params(model.encoder),
        "quant_conv+post_quant_conv": count_params(model.quant_conv) + count_params(model.post_quant_conv),
        "decoder": count_params(model.decoder),
        "quantizer": count_params(model.quantizer),
        "of which projector": 0 if projector is None else count_params(projector),
    }

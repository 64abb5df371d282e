"""Build the tokenizer and its discriminator from the `config.model`, `config.quantizer` and
`config.discriminator` blocks."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.models.discriminator import PatchDiscriminator, logits_size
from fvq_jax.models.vqgan import VQGAN, VQGAN_PRESETS, VQGANArch
from fvq_jax.quantizers.factory import build_quantizer, check_quantizer_config


def arch_from_config(cfg: ml_collections.ConfigDict, prefix: str = "model") -> VQGANArch:
    """A VQGANArch from `config.model` (explicit fields; `preset` only names where they came from)."""
    def f(name):
        return f"{prefix}.{name}"

    for name in ("ch", "enc_blocks", "dec_blocks", "z_channels", "norm_groups"):
        config_lib.require_number(cfg[name], f(name), integer=True)
    mult = tuple(cfg.ch_mult)
    config_lib.require(len(mult) >= 1 and all(isinstance(m, int) and m > 0 for m in mult), f("ch_mult"),
                       f"must be a non-empty tuple of positive ints, got {mult!r}")
    for m in sorted({cfg.ch * m for m in mult} | {cfg.z_channels}):
        config_lib.require(m % cfg.norm_groups == 0, f("norm_groups"),
                           f"{cfg.norm_groups} groups do not divide a layer's {m} channels")
    return VQGANArch(ch=cfg.ch, ch_mult=mult, enc_blocks=cfg.enc_blocks, dec_blocks=cfg.dec_blocks,
                     z_channels=cfg.z_channels, norm_groups=cfg.norm_groups)


def arch_fields(preset: str) -> dict:
    """The `config.model` fields of a named preset (VQ-8, VQ-16, VQ-32)."""
    if preset not in VQGAN_PRESETS:
        raise config_lib.ConfigError("model.preset", f"{preset!r} is not one of {list(VQGAN_PRESETS)}")
    arch = VQGAN_PRESETS[preset]
    return dict(preset=preset, ch=arch.ch, ch_mult=arch.ch_mult, enc_blocks=arch.enc_blocks,
                dec_blocks=arch.dec_blocks, z_channels=arch.z_channels, norm_groups=arch.norm_groups)


def check_tokenizer_config(config: ml_collections.ConfigDict) -> None:
    arch = arch_from_config(config.model)
    check_discriminator_config(config.discriminator)
    config_lib.require_number(config.data.image_size, "data.image_size", integer=True)
    size, layers = config.data.image_size, config.discriminator.num_layers
    config_lib.require(logits_size(size, layers) >= 1, "discriminator.num_layers",
                       f"{layers} stride-2 layers leave no logits for {size}x{size} images")
    check_quantizer_config(config.quantizer, token_grid=size // arch.downsample_factor)


def build_tokenizer(config: ml_collections.ConfigDict, *, dtype=jnp.float32, rngs: nnx.Rngs) -> VQGAN:
    """VQGAN(config.model) around build_quantizer(config.quantizer)."""
    arch = arch_from_config(config.model)
    return VQGAN(arch, build_quantizer(config.quantizer, rngs=rngs), dtype=dtype, rngs=rngs)


def check_discriminator_config(cfg: ml_collections.ConfigDict, prefix: str = "discriminator") -> None:
    for name in ("num_layers", "filters"):
        config_lib.require_number(cfg[name], f"{prefix}.{name}", integer=True)


def build_discriminator(cfg: ml_collections.ConfigDict, *, dtype=jnp.float32, rngs: nnx.Rngs) -> PatchDiscriminator:
    """PatchDiscriminator(config.discriminator) for RGB images (fields checked first)."""
    check_discriminator_config(cfg)
    return PatchDiscriminator(3, cfg.filters, cfg.num_layers, dtype=dtype, rngs=rngs)

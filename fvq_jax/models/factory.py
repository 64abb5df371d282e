"""Build models from config blocks: the tokenizer (`model`, `quantizer`), its discriminator, and the GPT
(`model` of a GPT config)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.models.discriminator import PatchDiscriminator, logits_size
from fvq_jax.models.gpt import GPT, GPTConfig
from fvq_jax.models.vqgan import VQGAN, VQGAN_PRESETS, VQGANArch
from fvq_jax.quantizers.factory import QuantizerSpec, build_quantizer


COMPUTE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def compute_dtype(precision: str):
    """The modules' compute dtype for config.precision (parameters stay float32): the one check of `precision`,
    of a run's config (train/spec.py) and of a saved one (models/load.py)."""
    config_lib.require_choice(precision, "precision", tuple(COMPUTE_DTYPES))
    return COMPUTE_DTYPES[precision]


def arch_fields(preset: str) -> dict:
    """The `config.model` fields of a named preset (VQ-8, VQ-16, VQ-32)."""
    if preset not in VQGAN_PRESETS:
        raise config_lib.ConfigError("model.preset", f"{preset!r} is not one of {list(VQGAN_PRESETS)}")
    arch = VQGAN_PRESETS[preset]
    return dict(preset=preset, ch=arch.ch, ch_mult=arch.ch_mult, enc_blocks=arch.enc_blocks,
                dec_blocks=arch.dec_blocks, z_channels=arch.z_channels, norm_groups=arch.norm_groups)


@dataclasses.dataclass(frozen=True)
class VQGANSpec(config_lib.Spec):
    """What builds a tokenizer: a config's `model` and `quantizer` blocks, resolved and checked
    (`VQGANSpec.from_config(config)`: errors name `model.<field>` / `quantizer.<field>`)."""

    model: VQGANArch
    quantizer: QuantizerSpec

    def token_grid(self, image_size: int, field: str = "data.image_size") -> int:
        """The side of the token grid of `image_size` images; ConfigError(field) when the encoder's
        downsampling does not divide it, or a multi-scale quantizer's last scale is another size."""
        factor = self.model.downsample_factor
        config_lib.require(image_size % factor == 0, field,
                           f"{image_size} is not divisible by the encoder's downsampling factor {factor} "
                           f"(model.ch_mult={tuple(self.model.ch_mult)}); use a multiple of {factor}")
        try:
            self.quantizer.check_token_grid(image_size // factor)
        except config_lib.ConfigError as error:
            raise error.under("quantizer") from None
        return image_size // factor


@dataclasses.dataclass(frozen=True)
class DiscriminatorSpec(config_lib.Spec):
    """The `discriminator` block: PatchGAN stride-2 layers and base filters."""

    num_layers: int
    filters: int

    def __post_init__(self):
        for name in ("num_layers", "filters"):
            config_lib.require_number(getattr(self, name), name, integer=True)

    def check_image_size(self, image_size: int) -> None:
        config_lib.require(logits_size(image_size, self.num_layers) >= 1, "discriminator.num_layers",
                           f"{self.num_layers} stride-2 layers leave no logits for {image_size}x{image_size} images")


def build_tokenizer(spec: VQGANSpec, *, dtype=jnp.float32, rngs: nnx.Rngs) -> VQGAN:
    """VQGAN(spec.model) around build_quantizer(spec.quantizer)."""
    return VQGAN(spec.model, build_quantizer(spec.quantizer, rngs=rngs), dtype=dtype, rngs=rngs)


def build_discriminator(spec: DiscriminatorSpec, *, dtype=jnp.float32, rngs: nnx.Rngs) -> PatchDiscriminator:
    """PatchDiscriminator(spec) for RGB images."""
    return PatchDiscriminator(3, spec.filters, spec.num_layers, dtype=dtype, rngs=rngs)


def build_gpt(cfg: ml_collections.ConfigDict, *, dtype=jnp.float32, rngs: nnx.Rngs) -> GPT:
    """GPT(config.model) in compute dtype `dtype` (parameters float32); the block resolved by GPTConfig, which
    names a bad field as model.<field>."""
    return GPT(GPTConfig.from_config(cfg, "model"), dtype=dtype, rngs=rngs)

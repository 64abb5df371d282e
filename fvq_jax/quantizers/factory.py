"""The `quantizer` block resolved once (`QuantizerSpec`), and the quantizer module it describes.

Types: "vq" (FVQ with a VQBridge projector; plain VQ with projector "none"), "residual"
(residual VQ, `residual_depth` levels sharing one codebook), "multiscale" (VAR-style, `scales`),
"ema" (EMA-updated codebook, `ema_decay`, projector "none").
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.quantizers import ops, vqbridge
from fvq_jax.quantizers.ema import EMAQuantizer
from fvq_jax.quantizers.multiscale import MultiScaleQuantizer, check_scales
from fvq_jax.quantizers.residual import ResidualQuantizer
from fvq_jax.quantizers.vq import SearchOptions, VectorQuantizer

QUANTIZER_TYPES = ("vq", "residual", "multiscale", "ema")
REVIVE_MODES = ("off", "copy")
RESTART_MODES = ("off", "pull", "claim")
# The projector's compute dtype (its activations); its parameters, the search and the losses stay float32.
BRIDGE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class QuantizerSpec(config_lib.Spec):
    """A checked `quantizer` block (configs/tokenizer.py describes each field).

    Fields declared `later(...)` were added after checkpoints were first written: a saved config without
    them reads as these values, which reproduce it (an older bf16 run's bridge, which followed the model's
    precision, then computes in fp32). The type-specific fields (residual_depth, scales, ema_decay) may be
    None for the types that do not read them.
    """

    type: str
    codebook_size: int
    code_dim: int
    projector: str
    beta: float
    entropy_weight: float
    entropy_temperature: float
    l2_norm: bool
    search_precision: str
    search_tile: int  # 0 = the whole codebook at once
    search_token_chunk: int  # 0 = all tokens per tile
    usage_window: int  # 0 = FVQ's window
    bridge_head_init_std: float
    residual_depth: int | None = None  # type=residual
    scales: tuple[int, ...] | None = None  # type=multiscale
    ema_decay: float | None = None  # type=ema
    search_impl: str = config_lib.later("xla")
    bridge_chunks: int = config_lib.later(1)
    bridge_dtype: str = config_lib.later("fp32")
    revive: str = config_lib.later("off")
    revive_every: int = config_lib.later(25)
    revive_noise: float = config_lib.later(0.01)
    restart: str = config_lib.later("off")
    restart_weight: float = config_lib.later(1.0)

    def __post_init__(self):
        require, number = config_lib.require, config_lib.require_number
        if isinstance(self.scales, list):  # read from JSON
            object.__setattr__(self, "scales", tuple(self.scales))
        config_lib.require_choice(self.type, "type", QUANTIZER_TYPES)
        for name in ("codebook_size", "code_dim", "bridge_chunks"):
            number(getattr(self, name), name, integer=True)
        try:
            vqbridge.check_projector(self.projector, self.codebook_size)
        except ValueError as e:
            raise config_lib.ConfigError("projector" if self.projector not in vqbridge.PROJECTORS else "codebook_size",
                                         str(e)) from None
        try:
            vqbridge.check_projector(self.projector, self.codebook_size, self.bridge_chunks)
        except ValueError as e:
            raise config_lib.ConfigError("bridge_chunks", str(e)) from None
        config_lib.require_choice(self.bridge_dtype, "bridge_dtype", tuple(BRIDGE_DTYPES))
        number(self.beta, "beta", strict=False)
        number(self.entropy_weight, "entropy_weight", strict=False)
        number(self.entropy_temperature, "entropy_temperature")
        config_lib.require_choice(self.search_precision, "search_precision", ops.PRECISIONS)
        config_lib.require_choice(self.search_impl, "search_impl", ops.SEARCH_IMPLS)
        for name in ("search_tile", "search_token_chunk", "usage_window"):  # 0 = default
            number(getattr(self, name), name, strict=False, integer=True)
        number(self.bridge_head_init_std, "bridge_head_init_std", strict=False)
        require(not self.bridge_head_init_std or self.bridged, "bridge_head_init_std",
                "applies to type=vq with a VQBridge projector only")
        config_lib.require_choice(self.revive, "revive", REVIVE_MODES)
        require(self.revive == "off" or self.bridged, "revive", "applies to type=vq with a VQBridge projector only")
        number(self.revive_every, "revive_every", integer=True)
        number(self.revive_noise, "revive_noise", strict=False)
        config_lib.require_choice(self.restart, "restart", RESTART_MODES)
        require(self.restart == "off" or self.type == "vq", "restart", f"applies to type=vq only, got type={self.type!r}")
        number(self.restart_weight, "restart_weight")
        if self.type in ("residual", "multiscale"):
            require(not self.l2_norm, "l2_norm",
                    f"type={self.type} quantizes residuals, which are not unit vectors; use l2_norm=False")
        if self.type == "residual":
            number(self.residual_depth, "residual_depth", integer=True)
        if self.type == "multiscale":
            require(isinstance(self.scales, tuple), "scales", f"must be a tuple of token-grid sides, got {self.scales!r}")
            self.check_token_grid(None)
        if self.type == "ema":
            require(self.projector == "none", "projector", f"type=ema updates the codebook without gradients, so it "
                    f"takes projector 'none', got {self.projector!r}")
            number(self.ema_decay, "ema_decay")
            require(self.ema_decay < 1, "ema_decay", f"must be < 1, got {self.ema_decay}")

    @property
    def bridged(self) -> bool:
        """type=vq with a VQBridge projector (what the in-patch position revive and metrics apply to)."""
        return self.type == "vq" and self.projector in vqbridge.BRIDGE_PRESETS

    def check_token_grid(self, token_grid: int | None) -> None:
        """ConfigError(scales) unless a multi-scale quantizer's scales end at the encoder's token grid."""
        if self.type == "multiscale":
            try:
                check_scales(self.scales, token_grid)
            except ValueError as e:
                raise config_lib.ConfigError("scales", str(e)) from None

    @property
    def search(self) -> SearchOptions:
        return SearchOptions(precision=self.search_precision, tile_size=self.search_tile or None,
                             token_chunk=self.search_token_chunk or None, impl=self.search_impl)


def build_quantizer(spec: QuantizerSpec, *, rngs: nnx.Rngs) -> nnx.Module:
    """The quantizer that `spec.type` names. The projector computes in `spec.bridge_dtype`, independently of
    the model's precision."""
    common = dict(beta=spec.beta, entropy_weight=spec.entropy_weight, entropy_temperature=spec.entropy_temperature,
                  search=spec.search, usage_window=spec.usage_window or None, dtype=BRIDGE_DTYPES[spec.bridge_dtype],
                  rngs=rngs)
    k, d = spec.codebook_size, spec.code_dim
    bridged = dict(projector=spec.projector, bridge_chunks=spec.bridge_chunks)
    if spec.type == "residual":
        return ResidualQuantizer(k, d, depth=spec.residual_depth, **bridged, **common)
    if spec.type == "multiscale":
        return MultiScaleQuantizer(k, d, scales=spec.scales, **bridged, **common)
    if spec.type == "ema":
        return EMAQuantizer(k, d, decay=spec.ema_decay, l2_norm=spec.l2_norm, **common)
    return VectorQuantizer(k, d, l2_norm=spec.l2_norm, bridge_head_init_std=spec.bridge_head_init_std,
                           restart=spec.restart, restart_weight=spec.restart_weight, **bridged, **common)

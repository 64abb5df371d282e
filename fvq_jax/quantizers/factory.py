"""Build a quantizer from the `config.quantizer` block, after checking its fields.

Types: "vq" (FVQ with a VQBridge projector; plain VQ with projector "none"), "residual"
(residual VQ, `residual_depth` levels sharing one codebook), "multiscale" (VAR-style, `scales`),
"ema" (EMA-updated codebook, `ema_decay`, projector "none").
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.quantizers import ops, vqbridge
from fvq_jax.quantizers.ema import EMAQuantizer
from fvq_jax.quantizers.multiscale import MultiScaleQuantizer, check_scales
from fvq_jax.quantizers.residual import ResidualQuantizer
from fvq_jax.quantizers.vq import SearchOptions, VectorQuantizer

QUANTIZER_TYPES = ("vq", "residual", "multiscale", "ema")
# Fields added after checkpoints were first written: a saved config without them gets these, today's
# defaults (an older bf16 run's bridge, which followed the model's precision, then computes in fp32).
LATER_FIELDS = {"search_impl": "xla", "bridge_chunks": 1, "bridge_dtype": "fp32", "revive": "off", "revive_every": 25,
                "revive_noise": 0.01, "restart": "off", "restart_weight": 1.0}
REVIVE_MODES = ("off", "copy")
RESTART_MODES = ("off", "pull", "claim")
# The projector's compute dtype (its activations); its parameters, the search and the losses stay float32.
BRIDGE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def check_quantizer_config(cfg: ml_collections.ConfigDict, prefix: str = "quantizer", *,
                           token_grid: int | None = None) -> None:
    """Raise ConfigError naming the field for any value the quantizer cannot take.

    token_grid: the side of the encoder's token grid, when known (the multi-scale quantizer's
    last scale must equal it).
    """
    def f(name):
        return f"{prefix}.{name}"

    cfg = with_later_fields(cfg)
    config_lib.require_choice(cfg.type, f("type"), QUANTIZER_TYPES)
    for name in ("codebook_size", "code_dim", "bridge_chunks"):
        config_lib.require_number(cfg[name], f(name), integer=True)
    try:
        vqbridge.check_projector(cfg.projector, cfg.codebook_size)
    except ValueError as e:
        field = "projector" if cfg.projector not in vqbridge.PROJECTORS else "codebook_size"
        raise config_lib.ConfigError(f(field), str(e)) from None
    try:
        vqbridge.check_projector(cfg.projector, cfg.codebook_size, cfg.bridge_chunks)
    except ValueError as e:
        raise config_lib.ConfigError(f("bridge_chunks"), str(e)) from None
    config_lib.require_choice(cfg.bridge_dtype, f("bridge_dtype"), tuple(BRIDGE_DTYPES))
    config_lib.require_number(cfg.beta, f("beta"), strict=False)
    config_lib.require_number(cfg.entropy_weight, f("entropy_weight"), strict=False)
    config_lib.require_number(cfg.entropy_temperature, f("entropy_temperature"))
    config_lib.require_choice(cfg.search_precision, f("search_precision"), ops.PRECISIONS)
    config_lib.require_choice(cfg.search_impl, f("search_impl"), ops.SEARCH_IMPLS)
    for name in ("search_tile", "search_token_chunk", "usage_window"):  # 0 = default
        config_lib.require_number(cfg[name], f(name), strict=False, integer=True)
    config_lib.require_number(cfg.bridge_head_init_std, f("bridge_head_init_std"), strict=False)
    config_lib.require(not cfg.bridge_head_init_std or (cfg.type == "vq" and cfg.projector in vqbridge.BRIDGE_PRESETS),
                       f("bridge_head_init_std"), "applies to type=vq with a VQBridge projector only")
    config_lib.require_choice(cfg.revive, f("revive"), REVIVE_MODES)
    config_lib.require(cfg.revive == "off" or (cfg.type == "vq" and cfg.projector in vqbridge.BRIDGE_PRESETS),
                       f("revive"), "applies to type=vq with a VQBridge projector only")
    config_lib.require_number(cfg.revive_every, f("revive_every"), integer=True)
    config_lib.require_number(cfg.revive_noise, f("revive_noise"), strict=False)
    config_lib.require_choice(cfg.restart, f("restart"), RESTART_MODES)
    config_lib.require(cfg.restart == "off" or cfg.type == "vq", f("restart"),
                       f"applies to type=vq only, got type={cfg.type!r}")
    config_lib.require_number(cfg.restart_weight, f("restart_weight"))

    if cfg.type in ("residual", "multiscale"):
        config_lib.require(not cfg.l2_norm, f("l2_norm"),
                           f"type={cfg.type} quantizes residuals, which are not unit vectors; use l2_norm=False")
    if cfg.type == "residual":
        config_lib.require_number(cfg.residual_depth, f("residual_depth"), integer=True)
    if cfg.type == "multiscale":
        config_lib.require(isinstance(cfg.scales, (tuple, list)), f("scales"),
                           f"must be a tuple of token-grid sides, got {cfg.scales!r}")
        try:
            check_scales(tuple(cfg.scales), token_grid)
        except ValueError as e:
            raise config_lib.ConfigError(f("scales"), str(e)) from None
    if cfg.type == "ema":
        config_lib.require(cfg.projector == "none", f("projector"),
                           f"type=ema updates the codebook without gradients, so it takes projector 'none', "
                           f"got {cfg.projector!r}")
        config_lib.require_number(cfg.ema_decay, f("ema_decay"))
        config_lib.require(cfg.ema_decay < 1, f("ema_decay"), f"must be < 1, got {cfg.ema_decay}")


def with_later_fields(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`cfg` with LATER_FIELDS filled in where a saved config predates them (a copy; `cfg` is untouched)."""
    missing = {k: v for k, v in LATER_FIELDS.items() if k not in cfg}
    return ml_collections.ConfigDict({**cfg.to_dict(), **missing}) if missing else cfg


def build_quantizer(cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
    """The quantizer that `cfg.type` names, configured from `cfg` (checked first).

    The projector computes in `cfg.bridge_dtype`, independently of the model's precision.
    """
    check_quantizer_config(cfg)
    cfg = with_later_fields(cfg)
    common = dict(
        beta=cfg.beta, entropy_weight=cfg.entropy_weight, entropy_temperature=cfg.entropy_temperature,
        search=SearchOptions(precision=cfg.search_precision, tile_size=cfg.search_tile or None,
                             token_chunk=cfg.search_token_chunk or None, impl=cfg.search_impl),
        usage_window=cfg.usage_window or None, dtype=BRIDGE_DTYPES[cfg.bridge_dtype], rngs=rngs)
    k, d = cfg.codebook_size, cfg.code_dim
    bridged = dict(projector=cfg.projector, bridge_chunks=cfg.bridge_chunks)
    if cfg.type == "residual":
        return ResidualQuantizer(k, d, depth=cfg.residual_depth, **bridged, **common)
    if cfg.type == "multiscale":
        return MultiScaleQuantizer(k, d, scales=tuple(cfg.scales), **bridged, **common)
    if cfg.type == "ema":
        return EMAQuantizer(k, d, decay=cfg.ema_decay, l2_norm=cfg.l2_norm, **common)
    return VectorQuantizer(k, d, l2_norm=cfg.l2_norm, bridge_head_init_std=cfg.bridge_head_init_std,
                           restart=cfg.restart, restart_weight=cfg.restart_weight, **bridged, **common)

"""Build a quantizer from the `config.quantizer` block, after checking its fields."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.quantizers import ops, vqbridge
from fvq_jax.quantizers.vq import SearchOptions, VectorQuantizer

QUANTIZER_TYPES = ("vq",)


def check_quantizer_config(cfg: ml_collections.ConfigDict, prefix: str = "quantizer") -> None:
    """Raise ConfigError naming the field for any value the quantizer cannot take."""
    def f(name):
        return f"{prefix}.{name}"

    config_lib.require_choice(cfg.type, f("type"), QUANTIZER_TYPES)
    for name in ("codebook_size", "code_dim"):
        config_lib.require_number(cfg[name], f(name), integer=True)
    try:
        vqbridge.check_projector(cfg.projector, cfg.codebook_size)
    except ValueError as e:
        field = "projector" if cfg.projector not in vqbridge.PROJECTORS else "codebook_size"
        raise config_lib.ConfigError(f(field), str(e)) from None
    config_lib.require_number(cfg.beta, f("beta"), strict=False)
    config_lib.require_number(cfg.entropy_weight, f("entropy_weight"), strict=False)
    config_lib.require_number(cfg.entropy_temperature, f("entropy_temperature"))
    config_lib.require_choice(cfg.search_precision, f("search_precision"), ops.PRECISIONS)
    for name in ("search_tile", "search_token_chunk", "usage_window"):  # 0 = default
        config_lib.require_number(cfg[name], f(name), strict=False, integer=True)


def build_quantizer(cfg: ml_collections.ConfigDict, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
    """The quantizer that `cfg.type` names, configured from `cfg` (checked first)."""
    check_quantizer_config(cfg)
    search = SearchOptions(
        precision=cfg.search_precision,
        tile_size=cfg.search_tile or None,
        token_chunk=cfg.search_token_chunk or None,
    )
    return VectorQuantizer(
        cfg.codebook_size, cfg.code_dim, projector=cfg.projector, beta=cfg.beta,
        entropy_weight=cfg.entropy_weight, entropy_temperature=cfg.entropy_temperature,
        l2_norm=cfg.l2_norm, search=search, usage_window=cfg.usage_window or None,
        dtype=dtype, rngs=rngs)

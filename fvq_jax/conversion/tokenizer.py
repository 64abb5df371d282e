"""Torch <-> Flax weights for the VQ-GAN tokenizer: the reference formats, their name table, and the
model a state dict describes.

Formats (keys of the reference's `VQModel` state dict; conv weights OIHW, Linear weights [out, in]):
  fvq       the FVQ release: `quantize.embedding.weight` is the raw codebook E [K, D] and `quantize.qbridge.*`
            the VQBridge (`x_embedder.proj` conv, `blocks.{i}.attn.qkv|proj`, `blocks.{i}.mlp.fc1|fc2`,
            `final_layer.linear`; its LayerNorms have no parameters) -> our projector "<size>/<patch>[-d<n>]";
  vqgan     the released baked tokenizer: no qbridge keys, `quantize.embedding.weight` is the searched
            codebook -> projector "none";
  llamagen  LlamaGen's VQ-8 / VQ-16: the vqgan layout, codes l2-normalised (D = 8).
Encoder and decoder follow LlamaGen's (taming) layout: `encoder.conv_in`; per level i
`encoder.conv_blocks.{i}.res.{j}` (norm1, conv1, norm2, conv2, and nin_shortcut where the width changes),
`.attn.{j}` at the lowest resolution (norm, q, k, v, proj_out), `.downsample.conv`; `encoder.mid.{0,1,2}`
(res, attn, res); `encoder.norm_out`, `encoder.conv_out`; `quant_conv`, `post_quant_conv`; the decoder mirrors
it, lowest resolution first, with `.upsample.conv` (the reference builds num_res_blocks blocks per encoder
level and num_res_blocks + 1 per decoder level: our enc_blocks and dec_blocks).

Shapes give K, D, ch, ch_mult, z_channels, the block counts and the bridge preset. What they cannot tell is
an argument: GroupNorm groups (the reference's: 32), whether codes are l2-normalised (the format's default),
and the bridge's head count (4 in every preset). LlamaGen's `quantize.codebook_used` buffer (a FIFO of
recent indices for its usage log) holds no weights: it is accepted and not converted.

Residual and multi-scale quantizers have no reference format: `export_spec` refuses them.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fvq_jax import sharding
from fvq_jax.conversion.table import (CONV, LINEAR, Row, Shape, StateDict, check_covers, check_kind, check_source,
                                      flatten, leaf_shapes, nest, setting, to_ours, to_torch)
from fvq_jax.models.factory import VQGANSpec, build_tokenizer
from fvq_jax.models.vqgan import VQGAN, VQGAN_PRESETS, VQGANArch
from fvq_jax.quantizers.export import bake
from fvq_jax.quantizers.vq import VectorQuantizer
from fvq_jax.quantizers.vqbridge import BRIDGE_PRESETS, BridgePreset

FORMATS = ("fvq", "vqgan", "llamagen")
DEFAULT_L2_NORM = {"fvq": False, "vqgan": False, "llamagen": True}
REFERENCE_NORM_GROUPS = 32  # the reference's Normalize(): GroupNorm(32 groups, eps 1e-6)
BRIDGE = "quantize.qbridge."
USAGE_BUFFER = "quantize.codebook_used"
USAGE_BUFFER_SIZE = 65_536  # LlamaGen registers it at this size whatever K is
# Where a file we wrote records what shapes cannot tell (safetensors metadata, a .pt's "fvq_jax" entry).
METADATA_KEYS = ("format", "l2_norm", "norm_groups")


class Unsupported(ValueError):
    """A model or state dict that is valid but has no counterpart on the other side."""


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """A reference tokenizer state dict, in our terms."""

    format: str
    arch: VQGANArch
    codebook_size: int
    code_dim: int
    projector: str  # "none" or a VQBridge preset
    l2_norm: bool

    def describe(self) -> str:
        a = self.arch
        return (f"{self.format} format: ch={a.ch} ch_mult={a.ch_mult} enc_blocks={a.enc_blocks} "
                f"dec_blocks={a.dec_blocks} z_channels={a.z_channels} norm_groups={a.norm_groups}, "
                f"K={self.codebook_size} D={self.code_dim} projector={self.projector} l2_norm={self.l2_norm}")

    def reference_notes(self) -> list[str]:
        """Where this tokenizer differs from what the reference's VQModel builds: a file of it has the
        reference's keys, but the reference code needs these changes to compute the same."""
        notes = []
        if self.arch.norm_groups != REFERENCE_NORM_GROUPS:
            notes.append(f"norm_groups={self.arch.norm_groups}: the reference's GroupNorm has {REFERENCE_NORM_GROUPS} "
                         f"groups (its Normalize())")
        if self.arch.dec_blocks != self.arch.enc_blocks + 1:
            notes.append(f"enc_blocks={self.arch.enc_blocks}, dec_blocks={self.arch.dec_blocks}: the reference builds "
                         f"num_res_blocks encoder and num_res_blocks + 1 decoder blocks per level")
        return notes

    def metadata(self) -> dict[str, str]:
        """What shapes cannot tell, as the string metadata an exported file carries."""
        return {"format": self.format, "l2_norm": str(self.l2_norm).lower(), "norm_groups": str(self.arch.norm_groups)}


# ----------------------------------------------------------------------------- the table


def _conv(ours: str, theirs: str) -> list[Row]:
    return [Row(f"{ours}/kernel", f"{theirs}.weight", CONV), Row(f"{ours}/bias", f"{theirs}.bias")]


def _linear(ours: str, theirs: str) -> list[Row]:
    return [Row(f"{ours}/kernel", f"{theirs}.weight", LINEAR), Row(f"{ours}/bias", f"{theirs}.bias")]


def _group_norm(ours: str, theirs: str) -> list[Row]:
    return [Row(f"{ours}/scale", f"{theirs}.weight"), Row(f"{ours}/bias", f"{theirs}.bias")]


def _resnet(ours: str, theirs: str, *, shortcut: bool) -> list[Row]:
    rows = (_group_norm(f"{ours}/norm1", f"{theirs}.norm1") + _conv(f"{ours}/conv1", f"{theirs}.conv1")
            + _group_norm(f"{ours}/norm2", f"{theirs}.norm2") + _conv(f"{ours}/conv2", f"{theirs}.conv2"))
    return rows + (_conv(f"{ours}/shortcut", f"{theirs}.nin_shortcut") if shortcut else [])


def _attn(ours: str, theirs: str) -> list[Row]:
    rows = _group_norm(f"{ours}/norm", f"{theirs}.norm")
    for name in ("q", "k", "v", "proj_out"):
        rows += _conv(f"{ours}/{name}", f"{theirs}.{name}")
    return rows


def _middle(part: str) -> list[Row]:
    return (_resnet(f"{part}/mid/res1", f"{part}.mid.0", shortcut=False) + _attn(f"{part}/mid/attn", f"{part}.mid.1")
            + _resnet(f"{part}/mid/res2", f"{part}.mid.2", shortcut=False))


def _bridge(preset: BridgePreset) -> list[Row]:
    ours = "quantizer/projector"
    rows = _conv(f"{ours}/patch_embed", f"{BRIDGE}x_embedder.proj")
    for i in range(preset.depth):
        block, theirs = f"{ours}/blocks/{i}", f"{BRIDGE}blocks.{i}"
        # qkv rows are (q, k, v) x heads x head_dim in both: the transpose is the whole conversion.
        rows += (_linear(f"{block}/qkv", f"{theirs}.attn.qkv") + _linear(f"{block}/proj", f"{theirs}.attn.proj")
                 + _linear(f"{block}/fc1", f"{theirs}.mlp.fc1") + _linear(f"{block}/fc2", f"{theirs}.mlp.fc2"))
    return rows + _linear(f"{ours}/head", f"{BRIDGE}final_layer.linear")


def table(spec: TokenizerSpec) -> tuple[Row, ...]:
    """One row per parameter of the tokenizer `spec` describes: (our path, torch key, hook)."""
    arch = spec.arch
    widths = [arch.ch * m for m in arch.ch_mult]
    last = len(widths) - 1
    rows = _conv("encoder/conv_in", "encoder.conv_in")
    ch_in = arch.ch
    for i, width in enumerate(widths):
        ours, theirs = f"encoder/levels/{i}", f"encoder.conv_blocks.{i}"
        for j in range(arch.enc_blocks):
            rows += _resnet(f"{ours}/res/{j}", f"{theirs}.res.{j}", shortcut=ch_in != width)
            ch_in = width
            if i == last:
                rows += _attn(f"{ours}/attn/{j}", f"{theirs}.attn.{j}")
        if i != last:
            rows += _conv(f"{ours}/resample/conv", f"{theirs}.downsample.conv")
    rows += _middle("encoder") + _group_norm("encoder/norm_out", "encoder.norm_out")
    rows += _conv("encoder/conv_out", "encoder.conv_out")
    rows += _conv("quant_conv", "quant_conv") + _conv("post_quant_conv", "post_quant_conv")
    rows += _conv("decoder/conv_in", "decoder.conv_in") + _middle("decoder")
    for i, width in enumerate(reversed(widths)):
        ours, theirs = f"decoder/levels/{i}", f"decoder.conv_blocks.{i}"
        for j in range(arch.dec_blocks):
            rows += _resnet(f"{ours}/res/{j}", f"{theirs}.res.{j}", shortcut=ch_in != width)
            ch_in = width
            if i == 0:
                rows += _attn(f"{ours}/attn/{j}", f"{theirs}.attn.{j}")
        if i != last:
            rows += _conv(f"{ours}/resample/conv", f"{theirs}.upsample.conv")
    rows += _group_norm("decoder/norm_out", "decoder.norm_out") + _conv("decoder/conv_out", "decoder.conv_out")
    rows.append(Row("quantizer/embedding", "quantize.embedding.weight"))
    if spec.projector != "none":
        rows += _bridge(BRIDGE_PRESETS[spec.projector])
    return tuple(rows)


# ----------------------------------------------------------------------------- torch -> ours


def _count(shapes: Mapping[str, Shape], prefix: str) -> int:
    """1 + the largest i among keys '<prefix><i>.*' (0 if none)."""
    found = {int(k[len(prefix):].split(".", 1)[0]) for k in shapes
             if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
    return max(found) + 1 if found else 0


def _shape(shapes: Mapping[str, Shape], key: str) -> Shape:
    if key not in shapes:
        raise ValueError(f"cannot tell the architecture: the state dict has no {key!r}")
    return tuple(shapes[key])


def bridge_preset(shapes: Mapping[str, Shape]) -> str:
    """The VQBridge preset whose width, patch and depth the `quantize.qbridge.*` shapes show."""
    width, _, patch, _ = _shape(shapes, f"{BRIDGE}x_embedder.proj.weight")
    depth = _count(shapes, f"{BRIDGE}blocks.")
    for name, preset in BRIDGE_PRESETS.items():
        if (preset.width, preset.patch, preset.depth) == (width, patch, depth):
            return name
    known = ", ".join(f"{n} ({p.width}/{p.patch}/{p.depth})" for n, p in BRIDGE_PRESETS.items())
    raise Unsupported(f"the state dict's VQBridge (width {width}, patch {patch}, depth {depth}) is not a preset we "
                      f"build; presets (width/patch/depth): {known}")


def infer_spec(state: Mapping[str, np.ndarray], *, format: str | None = None, norm_groups: int | None = None,
               l2_norm: bool | None = None) -> TokenizerSpec:
    """The tokenizer a torch state dict holds: the shapes decide the architecture; `format` (None or 'auto':
    fvq when it has qbridge keys, else vqgan), `norm_groups` (32) and `l2_norm` (the format's default) decide
    the rest, unless a file we exported recorded them (`StateDict.metadata`)."""
    state = StateDict.of(state)
    shapes, meta = state.shapes, state.metadata
    check_kind(shapes, "tokenizer")
    bridged = any(k.startswith(BRIDGE) for k in shapes)
    fmt = setting(None if format in (None, "auto") else format, meta, "format", "fvq" if bridged else "vqgan", str)
    if fmt not in FORMATS:
        raise ValueError(f"unknown tokenizer format {fmt!r}; choose one of {FORMATS}")
    if fmt == "fvq" and not bridged:
        raise ValueError("format fvq needs the VQBridge keys quantize.qbridge.*, and the state dict has none "
                         "(a baked codebook: format vqgan, or llamagen)")
    if fmt != "fvq" and bridged:
        raise ValueError(f"format {fmt} has a baked codebook, but the state dict has VQBridge keys "
                         f"(quantize.qbridge.*): use format fvq")
    ch = _shape(shapes, "encoder.conv_in.weight")[0]
    levels = _count(shapes, "encoder.conv_blocks.")
    if not levels:
        raise ValueError("cannot tell the architecture: the state dict has no encoder.conv_blocks.*")
    ch_mult = []
    for i in range(levels):
        width = _shape(shapes, f"encoder.conv_blocks.{i}.res.0.conv1.weight")[0]
        if width % ch:
            raise Unsupported(f"encoder level {i} is {width} wide, not a multiple of ch={ch}")
        ch_mult.append(width // ch)
    fields = dict(ch=ch, ch_mult=tuple(ch_mult), enc_blocks=_count(shapes, "encoder.conv_blocks.0.res."),
                  dec_blocks=_count(shapes, "decoder.conv_blocks.0.res."),
                  z_channels=_shape(shapes, "encoder.conv_out.weight")[0],
                  norm_groups=setting(norm_groups, meta, "norm_groups", REFERENCE_NORM_GROUPS, int))
    arch = VQGANArch.from_config(fields, "model")
    codebook_size, code_dim = _shape(shapes, "quantize.embedding.weight")
    return TokenizerSpec(format=fmt, arch=arch, codebook_size=codebook_size, code_dim=code_dim,
                         projector=bridge_preset(shapes) if fmt == "fvq" else "none",
                         l2_norm=setting(l2_norm, meta, "l2_norm", DEFAULT_L2_NORM[fmt], lambda s: s == "true"))


def model_config(spec: TokenizerSpec) -> ml_collections.ConfigDict:
    """The config blocks `build_tokenizer` needs to rebuild the tokenizer `spec` describes (ConfigError naming the
    field for a value it cannot build, e.g. norm_groups that do not divide a width)."""
    arch = spec.arch
    preset = next((name for name, p in VQGAN_PRESETS.items() if p == arch), "imported")
    config = ml_collections.ConfigDict()
    config.task = "tokenizer"
    config.precision = "fp32"
    config.model = dict(preset=preset, ch=arch.ch, ch_mult=arch.ch_mult, enc_blocks=arch.enc_blocks,
                        dec_blocks=arch.dec_blocks, z_channels=arch.z_channels, norm_groups=arch.norm_groups)
    # The reference quantizer's settings (LlamaGen's VectorQuantizer: beta 0.25, no entropy loss).
    config.quantizer = dict(
        type="vq", codebook_size=spec.codebook_size, code_dim=spec.code_dim, projector=spec.projector,
        l2_norm=spec.l2_norm, beta=0.25, entropy_weight=0.0, entropy_temperature=0.01, search_precision="fp32",
        search_tile=8192, search_token_chunk=0, usage_window=0, bridge_head_init_std=0.0)
    config.mesh = sharding.default_mesh_config()
    VQGANSpec.from_config(config)
    return config


def _abstract_params(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graph, parameters, other state) of the tokenizer `config` describes, abstract (nothing allocated)."""
    spec = VQGANSpec.from_config(config)
    return nnx.split(nnx.eval_shape(lambda: build_tokenizer(spec, rngs=nnx.Rngs(0))), nnx.Param, ...)


def _read_params(state: Mapping[str, np.ndarray], spec: TokenizerSpec, shapes: Mapping[str, Shape]) -> dict:
    state = StateDict.of(state)
    rows = table(spec)
    check_covers(rows, shapes)
    check_source(state.shapes, rows, shapes, ignored=(USAGE_BUFFER,), what=spec.describe())
    return nest(to_ours(state.__getitem__, rows))


def import_params(state: Mapping[str, np.ndarray], spec: TokenizerSpec) -> dict:
    """The tokenizer's parameters (nested like `nnx.to_pure_dict`, float32 numpy) from the torch `state`
    (a StateDict, read one array at a time, or a plain {key: array} dict).

    StateDictMismatch lists every missing, unexpected and mis-shaped key.
    """
    _, params, _ = _abstract_params(model_config(spec))
    return _read_params(state, spec, leaf_shapes(nnx.to_pure_dict(params)))


def initial_state(config: ml_collections.ConfigDict) -> dict:
    """A fresh tokenizer's non-parameter state (the empty usage window) as a pure dict. Jitted: the
    parameters' initialisation is traced and dropped, never computed."""
    @jax.jit
    def init():
        _, _, rest = nnx.split(build_tokenizer(VQGANSpec.from_config(config), rngs=nnx.Rngs(0)), nnx.Param, ...)
        return nnx.to_pure_dict(rest)

    return init()


def from_torch(state: Mapping[str, np.ndarray], spec: TokenizerSpec | None = None) -> VQGAN:
    """The VQGAN module holding the torch `state` (spec: default `infer_spec(state)`)."""
    spec = spec or infer_spec(state)
    config = model_config(spec)
    graph, params, rest = _abstract_params(config)
    arrays = _read_params(state, spec, leaf_shapes(nnx.to_pure_dict(params)))
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, arrays))
    nnx.replace_by_pure_dict(rest, initial_state(config))
    return nnx.merge(graph, params, rest)


# ----------------------------------------------------------------------------- ours -> torch


def export_spec(model: VQGAN, format: str | None = None) -> TokenizerSpec:
    """The state dict `model` exports to: `format` fvq (the default with a VQBridge; raw codebook + bridge),
    vqgan (the default otherwise; any projector baked in) or llamagen (baked; needs l2-normalised codes).
    Unsupported for quantizers the reference has no format for."""
    quantizer = model.quantizer
    if type(quantizer) is not VectorQuantizer:
        raise Unsupported(f"{type(quantizer).__name__}: the reference's VQModel holds one codebook searched once, "
                          f"so it has no format for this quantizer; only type 'vq' (plain VQ or FVQ) exports to torch")
    projector = quantizer.projector_name
    fmt = format or ("fvq" if projector in BRIDGE_PRESETS else "vqgan")
    if fmt not in FORMATS:
        raise ValueError(f"unknown tokenizer format {fmt!r}; choose one of {FORMATS}")
    if fmt == "fvq" and projector not in BRIDGE_PRESETS:
        raise Unsupported(f"format fvq stores a VQBridge, and this tokenizer's projector is {projector!r}: "
                          f"export it as vqgan (the projector's output baked into the codebook)")
    if fmt == "llamagen" and not quantizer.l2_norm:
        raise Unsupported("format llamagen means l2-normalised codes (LlamaGen's codebook_l2_norm), and this "
                          "tokenizer has l2_norm=False: export it as vqgan")
    embedding = quantizer.embedding
    return TokenizerSpec(format=fmt, arch=model.arch, codebook_size=int(embedding.shape[0]),
                         code_dim=int(embedding.shape[1]), projector=projector if fmt == "fvq" else "none",
                         l2_norm=quantizer.l2_norm)


def to_state_dict(model: VQGAN, format: str | None = None) -> tuple[TokenizerSpec, Iterator[tuple[str, np.ndarray]]]:
    """(spec, (torch key, numpy array) pairs) of `model` in `format` (see `export_spec`). Each array is
    gathered to the host when its turn comes (`jax.device_get` per leaf), so a sharded model never needs
    more host memory than the state dict being written."""
    spec = export_spec(model, format)
    if spec.projector == "none" and model.quantizer.projector_name != "none":
        model = bake(model)
    params = nnx.state(model, nnx.Param)
    rows = table(spec)
    check_covers(rows, leaf_shapes(nnx.to_pure_dict(params)))
    params = flatten(nnx.to_pure_dict(params))

    def items():
        yield from to_torch(lambda path: np.asarray(jax.device_get(params[path])), rows)
        if spec.format == "llamagen":  # LlamaGen's VQModel (show_usage) loads strictly only with its buffer
            yield USAGE_BUFFER, np.zeros((USAGE_BUFFER_SIZE,), np.float32)

    return spec, items()

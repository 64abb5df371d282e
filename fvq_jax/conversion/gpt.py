"""Torch <-> Flax weights for LlamaGen's class-conditional GPT: the name table, its hooks, the model a state dict
describes.

Keys (the reference's c2i `Transformer`; torch Linear weights [out, in], no biases anywhere):
  tok_embeddings.weight [K, dim]; cls_embedding.embedding_table.weight [num_classes + 1, dim] (the last row is
  the null class); per layer `layers.{i}.`: attention_norm.weight, attention.wqkv.weight [3 dim, dim] (q, k, v
  stacked, heads contiguous), attention.wo.weight [dim, dim], ffn_norm.weight, feed_forward.w1 / w3 [ffn_dim,
  dim] (gate / up), feed_forward.w2 [dim, ffn_dim]; norm.weight; output.weight [K, dim].
Our attention keeps the heads as an axis (tensor parallelism splits it): wqkv [dim, 3, H, hd], wo [H, hd, dim],
so those two hooks are built for a head count. Every hook is a transpose or a reshape: both directions exact.

The shapes give dim, n_layer, K, the classes and ffn_dim. The reference file stores neither the head count
(taken from the preset of the same dim and depth, else an argument) nor the token grid of the tokenizer the GPT
was trained on (an argument: 16 for 256px images with VQ-16, 24 for 384px). Files export_torch writes record
both as metadata, which is read back unless an argument says otherwise.

The table names the layers one by one (`layers/<i>/...`, the looped layout); a scanned GPT's stacked
parameters convert through `models.gpt.stack_layers` / `unstack_layers`, so both layouts read and write the
same torch file.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fvq_jax import sharding
from fvq_jax.conversion.table import (LINEAR, Hook, Row, Shape, StateDict, check_covers, check_kind, check_source,
                                      flatten, leaf_shapes, nest, setting, to_ours, to_torch)
from fvq_jax.models.gpt import CUSTOM, GPT, GPT_PRESETS, GPTConfig, stack_layers, unstack_layers


# ----------------------------------------------------------------------------- hooks


def wqkv_hook(n_head: int, head_dim: int) -> Hook:
    """[3 dim, dim] (rows: q, k, v, each head-major) <-> [dim, 3, H, hd]."""
    dim = n_head * head_dim
    return Hook(f"wqkv [3 dim, dim] <-> [dim, 3, {n_head}, {head_dim}]",
                lambda w: w.reshape(3, n_head, head_dim, dim).transpose(3, 0, 1, 2),
                lambda k: k.transpose(1, 2, 3, 0).reshape(3 * dim, dim))


def wo_hook(n_head: int, head_dim: int) -> Hook:
    """[dim, dim] (input columns head-major) <-> [H, hd, dim]."""
    dim = n_head * head_dim
    return Hook(f"wo [dim, dim] <-> [{n_head}, {head_dim}, dim]",
                lambda w: w.T.reshape(n_head, head_dim, dim),
                lambda k: k.reshape(dim, dim).T)


# ----------------------------------------------------------------------------- the table


def table(config: GPTConfig) -> tuple[Row, ...]:
    """One row per parameter of the GPT `config` describes, in the looped layout: (our path, torch key, hook)."""
    wqkv, wo = wqkv_hook(config.n_head, config.head_dim), wo_hook(config.n_head, config.head_dim)
    rows = [Row("tok_embeddings/embedding", "tok_embeddings.weight"),
            Row("cls_embedding/embedding", "cls_embedding.embedding_table.weight")]
    for i in range(config.n_layer):
        ours, theirs = f"layers/{i}", f"layers.{i}"
        rows += [Row(f"{ours}/attention_norm/scale", f"{theirs}.attention_norm.weight"),
                 Row(f"{ours}/attention/wqkv/kernel", f"{theirs}.attention.wqkv.weight", wqkv),
                 Row(f"{ours}/attention/wo/kernel", f"{theirs}.attention.wo.weight", wo),
                 Row(f"{ours}/ffn_norm/scale", f"{theirs}.ffn_norm.weight")]
        rows += [Row(f"{ours}/feed_forward/{w}/kernel", f"{theirs}.feed_forward.{w}.weight", LINEAR)
                 for w in ("w1", "w3", "w2")]
    return tuple(rows + [Row("norm/scale", "norm.weight"), Row("output/kernel", "output.weight", LINEAR)])


def describe(config: GPTConfig) -> str:
    return (f"dim={config.dim} n_layer={config.n_layer} n_head={config.n_head} ffn_dim={config.ffn_dim} "
            f"vocab_size={config.vocab_size} num_classes={config.num_classes} grid={config.grid}")


def preset_of(dim: int, n_layer: int, n_head: int) -> str:
    """The GPT_PRESETS name of (dim, n_layer, n_head), or "custom"."""
    return next((name for name, p in GPT_PRESETS.items() if (p.dim, p.n_layer, p.n_head) == (dim, n_layer, n_head)),
                CUSTOM)


def metadata(config: GPTConfig) -> dict[str, str]:
    """What the shapes cannot tell, as the string metadata an exported file carries."""
    return {"n_head": str(config.n_head), "grid": str(config.grid)}


# ----------------------------------------------------------------------------- torch -> ours


def _ffn_dim(shapes: Mapping[str, Shape], layers: list[int]) -> int:
    for i in layers:
        for name, axis in (("w1", 0), ("w3", 0), ("w2", 1)):
            shape = shapes.get(f"layers.{i}.feed_forward.{name}.weight")
            if shape is not None and len(shape) == 2:
                return shape[axis]
    raise ValueError("cannot tell ffn_dim: the state dict has no layers.*.feed_forward.w1 / w3 / w2.weight")


def infer_config(state: Mapping[str, np.ndarray], *, grid: int | None = None, n_head: int | None = None,
                 **overrides) -> GPTConfig:
    """The GPT a LlamaGen state dict (a StateDict or {key: array}) holds. dim, vocab_size, num_classes (table rows
    - 1: the last row is the null class), n_layer and ffn_dim come from the shapes; `n_head` and `grid` from the
    arguments, else what a file we exported recorded, else (n_head only) the preset of the same dim and n_layer.
    The rest (dropouts, rope_base, norm_eps: none of it is in the file) are GPTConfig's defaults, which are
    LlamaGen's; `overrides` replace them or set remat / scan_layers."""
    state = StateDict.of(state)
    shapes, meta = state.shapes, state.metadata
    check_kind(shapes, "gpt")
    vocab_size, dim = shapes["tok_embeddings.weight"]
    layers = sorted({int(m.group(1)) for key in shapes if (m := re.match(r"layers\.(\d+)\.", key))})
    if not layers:
        raise ValueError("cannot tell n_layer: the state dict has no layers.* keys")
    n_layer = layers[-1] + 1
    n_head = setting(n_head, meta, "n_head", None, int)
    if n_head is None:
        matches = [p.n_head for p in GPT_PRESETS.values() if (p.dim, p.n_layer) == (dim, n_layer)]
        if not matches:
            known = ", ".join(f"{name} ({p.dim}/{p.n_layer}/{p.n_head})" for name, p in GPT_PRESETS.items())
            raise ValueError(f"n_head is not stored in a LlamaGen state dict, and its dim={dim}, n_layer={n_layer} "
                             f"match no preset (dim/n_layer/n_head: {known}): give n_head (import_torch --n-head)")
        n_head = matches[0]
    if n_head < 1 or dim % n_head:
        raise ValueError(f"n_head={n_head} does not divide the model width dim={dim} (read from tok_embeddings); "
                         f"divisors of {dim}: {[h for h in range(1, dim + 1) if dim % h == 0]}")
    grid = setting(grid, meta, "grid", None, int)
    if grid is None:
        raise ValueError("the token grid is not stored in a LlamaGen state dict: give grid (import_torch --grid), "
                         "the token grid side of the tokenizer the GPT was trained on (16 for 256px images with "
                         "VQ-16, 24 for 384px)")
    return GPTConfig(preset=preset_of(dim, n_layer, n_head), dim=dim, n_layer=n_layer, n_head=n_head,
                     vocab_size=vocab_size, num_classes=shapes["cls_embedding.embedding_table.weight"][0] - 1,
                     grid=grid, ffn_dim=_ffn_dim(shapes, layers), **overrides)


def model_config(config: GPTConfig) -> ml_collections.ConfigDict:
    """The config `models.load.load_gpt` rebuilds `config`'s GPT from: task "gpt", precision "fp32", and the model
    block holding every field of `config`."""
    out = ml_collections.ConfigDict()
    out.task = "gpt"
    out.precision = "fp32"
    out.model = dataclasses.asdict(config)
    out.mesh = sharding.default_mesh_config()
    return out


def _abstract(config: GPTConfig, dtype=jnp.float32) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graph, parameters, other state) of `config`'s GPT, abstract (nothing allocated)."""
    return nnx.split(nnx.eval_shape(lambda: GPT(config, dtype=dtype, rngs=nnx.Rngs(0))), nnx.Param, ...)


def _looped_shapes(config: GPTConfig, params: nnx.State) -> dict[str, Shape]:
    """{our path in the looped layout: shape} of `config`'s GPT parameters `params` (abstract or not)."""
    pure = nnx.to_pure_dict(params)
    return leaf_shapes(jax.eval_shape(unstack_layers, pure) if config.scan_layers else pure)


def _read_params(state: Mapping[str, np.ndarray], config: GPTConfig, params: nnx.State) -> dict:
    state = StateDict.of(state)
    rows = table(config)
    our_shapes = _looped_shapes(config, params)
    check_covers(rows, our_shapes)
    check_source(state.shapes, rows, our_shapes, what=f"LlamaGen GPT, {describe(config)}")
    looped = nest(to_ours(state.__getitem__, rows))
    return stack_layers(looped) if config.scan_layers else looped


def import_params(state: Mapping[str, np.ndarray], config: GPTConfig) -> dict:
    """The GPT's parameters (nested like `nnx.to_pure_dict`, float32 numpy, in `config`'s layout: stacked when it
    scans its layers) from the torch `state` (a StateDict,
    read one array at a time, or a plain {key: array} dict). StateDictMismatch lists every missing, unexpected
    and mis-shaped key."""
    _, params, _ = _abstract(config)
    return _read_params(state, config, params)


def from_torch(state: Mapping[str, np.ndarray], config: GPTConfig | None = None, *, dtype=jnp.float32) -> GPT:
    """The GPT holding the torch `state` (config: default `infer_config(state)`), in compute dtype `dtype`; built
    abstractly, so no random initialisation is computed only to be overwritten."""
    config = config or infer_config(state)
    graph, params, rest = _abstract(config, dtype)
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, _read_params(state, config, params)))
    return nnx.merge(graph, params, rest)


# ----------------------------------------------------------------------------- ours -> torch


def to_state_dict(model: GPT) -> Iterator[tuple[str, np.ndarray]]:
    """(torch key, numpy array) pairs of `model` in the reference's layout. Each array is gathered to the host when
    its turn comes (`jax.device_get` per leaf), so a sharded model never needs more host memory than the state
    dict being written (a scanned model's layers are sliced on the device first)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = unstack_layers(params) if model.config.scan_layers else params
    rows = table(model.config)
    check_covers(rows, leaf_shapes(params))
    params = flatten(params)
    return to_torch(lambda path: np.asarray(jax.device_get(params[path])), rows)

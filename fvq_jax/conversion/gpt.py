"""LlamaGen GPT state dict <-> our GPT parameters: one table row per parameter, small transform hooks.

Our names are the flat NNX parameter paths of models.gpt.GPT ('layers.3.attention.wqkv.kernel'); theirs
are the reference's state-dict keys ('layers.3.attention.wqkv.weight'). Both directions are exact
(transposes and reshapes only). Pure numpy: no torch import here; pass `{k: v.numpy()}` of a torch state
dict. Any missing, unexpected or mis-shaped tensor is an error that lists all of them.

The reference stores no head count and no grid size: give them (`infer_config(..., n_head=, grid=)`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from fvq_jax.models.gpt import GPT, GPTConfig

Hook = Callable[[np.ndarray, GPTConfig], np.ndarray]


# ----------------------------------------------------------------------------- hooks


def as_is(x: np.ndarray, config: GPTConfig) -> np.ndarray:
    return x


def linear_kernel(weight: np.ndarray, config: GPTConfig) -> np.ndarray:
    """torch Linear [out, in] -> [in, out] (and back: the transpose is its own inverse)."""
    return weight.T


def wqkv_kernel(weight: np.ndarray, config: GPTConfig) -> np.ndarray:
    """[3 dim, dim] (rows: q, k, v; within each, head-major) -> [dim, 3, H, hd]."""
    return weight.reshape(3, config.n_head, config.head_dim, config.dim).transpose(3, 0, 1, 2)


def wqkv_weight(kernel: np.ndarray, config: GPTConfig) -> np.ndarray:
    """[dim, 3, H, hd] -> [3 dim, dim]."""
    return kernel.transpose(1, 2, 3, 0).reshape(3 * config.dim, config.dim)


def wo_kernel(weight: np.ndarray, config: GPTConfig) -> np.ndarray:
    """[dim, dim] (input columns head-major) -> [H, hd, dim]."""
    return weight.T.reshape(config.n_head, config.head_dim, config.dim)


def wo_weight(kernel: np.ndarray, config: GPTConfig) -> np.ndarray:
    """[H, hd, dim] -> [dim, dim]."""
    return kernel.reshape(config.dim, config.dim).T


# ----------------------------------------------------------------------------- table


@dataclasses.dataclass(frozen=True)
class Row:
    """One parameter: our path, the reference key, the hooks each way, the reference shape."""

    ours: str
    theirs: str
    to_ours: Hook
    to_theirs: Hook
    torch_shape: Callable[[GPTConfig], tuple[int, ...]]


def _square(c: GPTConfig) -> tuple[int, ...]:
    return (c.dim, c.dim)


def _vector(c: GPTConfig) -> tuple[int, ...]:
    return (c.dim,)


GLOBAL_ROWS = (
    Row("tok_embeddings.embedding", "tok_embeddings.weight", as_is, as_is, lambda c: (c.vocab_size, c.dim)),
    Row("cls_embedding.embedding", "cls_embedding.embedding_table.weight", as_is, as_is,
        lambda c: (c.num_classes + 1, c.dim)),
    Row("norm.scale", "norm.weight", as_is, as_is, _vector),
    Row("output.kernel", "output.weight", linear_kernel, linear_kernel, lambda c: (c.vocab_size, c.dim)),
)
# Per layer; `{i}` is the layer index.
LAYER_ROWS = (
    Row("layers.{i}.attention_norm.scale", "layers.{i}.attention_norm.weight", as_is, as_is, _vector),
    Row("layers.{i}.attention.wqkv.kernel", "layers.{i}.attention.wqkv.weight", wqkv_kernel, wqkv_weight,
        lambda c: (3 * c.dim, c.dim)),
    Row("layers.{i}.attention.wo.kernel", "layers.{i}.attention.wo.weight", wo_kernel, wo_weight, _square),
    Row("layers.{i}.ffn_norm.scale", "layers.{i}.ffn_norm.weight", as_is, as_is, _vector),
    Row("layers.{i}.feed_forward.w1.kernel", "layers.{i}.feed_forward.w1.weight", linear_kernel, linear_kernel,
        lambda c: (c.ffn_dim, c.dim)),
    Row("layers.{i}.feed_forward.w3.kernel", "layers.{i}.feed_forward.w3.weight", linear_kernel, linear_kernel,
        lambda c: (c.ffn_dim, c.dim)),
    Row("layers.{i}.feed_forward.w2.kernel", "layers.{i}.feed_forward.w2.weight", linear_kernel, linear_kernel,
        lambda c: (c.dim, c.ffn_dim)),
)


def table(n_layer: int) -> tuple[Row, ...]:
    """Every row for an n_layer model, layer rows expanded."""
    layers = tuple(dataclasses.replace(row, ours=row.ours.format(i=i), theirs=row.theirs.format(i=i))
                   for i in range(n_layer) for row in LAYER_ROWS)
    return GLOBAL_ROWS + layers


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Our flat parameter names -> shapes, from the model itself (abstract: nothing is allocated)."""
    model = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
    return {_name(path): tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ----------------------------------------------------------------------------- conversion


def infer_config(torch_state: Mapping[str, np.ndarray], *, n_head: int, grid: int, **overrides) -> GPTConfig:
    """GPTConfig from the reference state dict's shapes; n_head and grid are not stored there.

    dim, vocab_size, num_classes (table rows - 1, the last row being the null class), n_layer and
    ffn_dim come from the tensors; `overrides` set the remaining fields (dropouts, remat, ...).
    """
    for key in ("tok_embeddings.weight", "cls_embedding.embedding_table.weight", "layers.0.feed_forward.w1.weight"):
        if key not in torch_state:
            raise ValueError(f"not a LlamaGen GPT state dict: no {key!r}")
    vocab_size, dim = np.shape(torch_state["tok_embeddings.weight"])
    if dim % n_head:
        raise ValueError(f"n_head={n_head} does not divide the model width dim={dim} (read from tok_embeddings); "
                         f"divisors of {dim}: {[h for h in range(1, dim + 1) if dim % h == 0]}")
    layers = {int(m.group(1)) for k in torch_state if (m := re.match(r"layers\.(\d+)\.", k))}
    return GPTConfig(dim=dim, n_layer=max(layers) + 1, n_head=n_head, vocab_size=vocab_size,
                     num_classes=np.shape(torch_state["cls_embedding.embedding_table.weight"])[0] - 1, grid=grid,
                     ffn_dim=np.shape(torch_state["layers.0.feed_forward.w1.weight"])[0], **overrides)


def _check(found: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise one ValueError listing every missing, unexpected and mis-shaped entry."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(f"{k}: {tuple(np.shape(found[k]))}, expected {expected[k]}" for k in expected
                       if k in found and tuple(np.shape(found[k])) != tuple(expected[k]))
    problems = [f"missing {missing}"] * bool(missing) + [f"unexpected {unexpected}"] * bool(unexpected)
    problems += [f"mis-shaped {misshaped}"] * bool(misshaped)
    if problems:
        raise ValueError(f"{what} does not match the GPT: " + "; ".join(problems))


def from_torch(torch_state: Mapping[str, np.ndarray], config: GPTConfig) -> dict[str, np.ndarray]:
    """Reference state dict (numpy values) -> {our flat name: float32 array}."""
    rows = table(config.n_layer)
    _check(torch_state, {row.theirs: row.torch_shape(config) for row in rows}, "the torch state dict")
    return {row.ours: np.asarray(row.to_ours(np.asarray(torch_state[row.theirs], np.float32), config))
            for row in rows}


def to_torch(params: Mapping[str, np.ndarray], config: GPTConfig) -> dict[str, np.ndarray]:
    """{our flat name: array} -> the reference state dict (numpy float32, contiguous)."""
    _check(params, param_shapes(config), "the parameters")
    return {row.theirs: np.ascontiguousarray(row.to_theirs(np.asarray(params[row.ours], np.float32), config))
            for row in table(config.n_layer)}


# ----------------------------------------------------------------------------- model access


def _name(path) -> str:
    return ".".join(str(p) for p in path)


def model_params(model: GPT) -> dict[str, np.ndarray]:
    """{our flat name: numpy array} of a model's parameters."""
    return {_name(path): np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_params(model: GPT, params: Mapping[str, np.ndarray]) -> None:
    """Write {our flat name: array} into `model` (every parameter, exact shapes; `model` may be abstract,
    from nnx.eval_shape)."""
    state = nnx.state(model, nnx.Param)
    paths = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    _check(params, {_name(p): tuple(v.shape) for p, v in paths.items()}, "the parameters")
    pure = traverse_util.unflatten_dict({p: jnp.asarray(params[_name(p)], v.dtype) for p, v in paths.items()})
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def gpt_from_torch(torch_state: Mapping[str, np.ndarray], *, n_head: int, grid: int, dtype=jnp.float32,
                   **overrides) -> GPT:
    """A GPT holding the reference weights (config from `infer_config`); built abstractly, so no random
    init is computed only to be overwritten."""
    config = infer_config(torch_state, n_head=n_head, grid=grid, **overrides)
    model = nnx.eval_shape(lambda: GPT(config, dtype=dtype, rngs=nnx.Rngs(0)))
    load_params(model, from_torch(torch_state, config))
    return model

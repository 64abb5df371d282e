"""VQBridge and the other codebook projectors, chosen by name.

A projector maps the raw trainable codebook E [K, D] to the codebook the quantizer searches
[K, D]. VQBridge (compress - process - recover) lays E out as a sqrt(K) x sqrt(K) image with D
channels (code n at row n // sqrt(K), column n % sqrt(K)), embeds p x p patches, runs a small
pre-LN ViT over them and projects each token back to its p x p block of codes. Because every
code comes out of one shared network, a gradient on any selected code updates all K codes.

Names: "<size>/<patch>" with size in XS, S, B, L, XL (e.g. "L/4"), depth variants
"<size>/<patch>-d<depth>" (e.g. "B/4-d4"), and the ablation projectors "none" (identity),
"lin/1" (one D x D Linear) and "lin/5" (five Linear layers with ReLU between).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from fvq_jax.nn import torch_bias_init, torch_kernel_init

xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()


@dataclasses.dataclass(frozen=True)
class BridgePreset:
    head_dim: int
    patch: int
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: int = 2

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim


_SIZES = {"XS": (8, (2,)), "S": (16, (2, 4, 8)), "B": (32, (2, 4, 8)), "L": (64, (2, 4, 8)), "XL": (128, (4, 8))}
_DEPTH_VARIANTS = ("B/4-d1", "B/4-d4", "S/4-d4", "L/4-d1", "L/4-d4", "L/2-d4", "XL/4-d4")


def _build_presets() -> dict[str, BridgePreset]:
    presets = {}
    for size, (head_dim, patches) in _SIZES.items():
        for patch in patches:
            presets[f"{size}/{patch}"] = BridgePreset(head_dim, patch)
    for name in _DEPTH_VARIANTS:
        base, depth = name.split("-d")
        presets[name] = dataclasses.replace(presets[base], depth=int(depth))
    return presets


BRIDGE_PRESETS: dict[str, BridgePreset] = _build_presets()
ABLATION_PROJECTORS = ("none", "lin/1", "lin/5")
PROJECTORS = ABLATION_PROJECTORS + tuple(BRIDGE_PRESETS)


def codebook_side(codebook_size: int) -> int:
    """sqrt(K), or a ValueError when K is not a perfect square."""
    side = math.isqrt(codebook_size) if codebook_size > 0 else 0
    if side * side != codebook_size or side == 0:
        raise ValueError(
            f"codebook_size={codebook_size} is not a perfect square: VQBridge lays the codebook out as a "
            f"sqrt(K) x sqrt(K) grid (nearest valid sizes: {max(side, 1) ** 2}, {(side + 1) ** 2})")
    return side


def grid_side(codebook_size: int, patch: int, chunks: int = 1) -> int:
    """sqrt(K), after checking that the sqrt(K) x sqrt(K) grid tiles into p x p patches whose
    sqrt(K) / p rows split into `chunks` equal bands."""
    side = codebook_side(codebook_size)
    if side % patch:
        raise ValueError(
            f"codebook side {side} (codebook_size={codebook_size}) is not divisible by the bridge patch size {patch}")
    if not isinstance(chunks, int) or chunks < 1 or (side // patch) % chunks:
        raise ValueError(f"bridge chunks={chunks!r} must be a positive divisor of the {side // patch} patch rows "
                         f"(codebook_size={codebook_size}, patch size {patch})")
    return side


def check_projector(name: str, codebook_size: int, bridge_chunks: int = 1) -> None:
    """Raise a ValueError naming the problem if projector `name` cannot serve a K-entry codebook
    (in `bridge_chunks` bands, for a VQBridge)."""
    if name not in PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; choose one of {', '.join(PROJECTORS)}")
    if name in BRIDGE_PRESETS:
        grid_side(codebook_size, BRIDGE_PRESETS[name].patch, bridge_chunks)
    elif bridge_chunks != 1:
        raise ValueError(f"bridge chunks={bridge_chunks!r} applies to VQBridge projectors only, not {name!r}")


def plain_layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm over the last axis without scale or bias, statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunks: int = 1) -> jax.Array:
    """`jax.nn.dot_product_attention` over `chunks` equal slices of the queries.

    q, k, v: [B, T, heads, head_dim] -> [B, T, heads, head_dim]. With chunks > 1 each slice is
    recomputed in the backward pass, so the largest attention temporary is [B, heads, T / chunks, T]
    instead of [B, heads, T, T], forward and backward. chunks = 1 is the plain call.
    """
    if chunks == 1:
        return jax.nn.dot_product_attention(q, k, v)
    b, t = q.shape[:2]
    slices = q.reshape(b, chunks, t // chunks, *q.shape[2:]).swapaxes(0, 1)
    # Inside a scan nothing can merge the recomputation with the forward pass, so no CSE barrier.
    attend = jax.checkpoint(lambda q_slice: jax.nn.dot_product_attention(q_slice, k, v), prevent_cse=False)
    out = jax.lax.map(attend, slices)
    return out.swapaxes(0, 1).reshape(q.shape)


class BridgeBlock(nnx.Module):
    """Pre-LN transformer block: x + MHSA(LN(x)); x + MLP(LN(x)). LN without affine.

    attention_chunks: slices of the queries the attention runs in (see `chunked_attention`).
    """

    def __init__(self, width: int, num_heads: int, mlp_ratio: int, *, attention_chunks: int = 1,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"bridge width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attention_chunks = attention_chunks
        dense = dict(kernel_init=xavier_uniform, bias_init=zeros, dtype=dtype, rngs=rngs)
        self.qkv = nnx.Linear(width, 3 * width, **dense)
        self.proj = nnx.Linear(width, width, **dense)
        self.fc1 = nnx.Linear(width, mlp_ratio * width, **dense)
        self.fc2 = nnx.Linear(mlp_ratio * width, width, **dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, H] -> [B, T, H]."""
        b, t, width = x.shape
        qkv = self.qkv(plain_layer_norm(x)).reshape(b, t, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        x = x + self.proj(chunked_attention(q, k, v, self.attention_chunks).reshape(b, t, width))
        return x + self.fc2(jax.nn.gelu(self.fc1(plain_layer_norm(x)), approximate=True))


class VQBridge(nnx.Module):
    """Compress (patch embed) - process (ViT blocks) - recover (LN + zero-init Linear, unpatchify).

    There is no skip from E to the output: at step 0 every output code is exactly zero.

    head_init_std > 0 replaces the zero-initialised head kernel with N(0, std^2) (bias still
    zero): an investigation knob, not the method. With the zero head, the p*p in-patch positions
    share one zero code until one of them is selected, and only a selected position's head rows
    ever get a gradient (see the README's small-scale reproduction).

    chunks > 1 cuts the work into that many bands of whole patch rows: the patch embedding and the
    head run one band of the grid at a time, and the attention one band of queries at a time
    (recomputed in the backward pass). The largest temporaries shrink from [heads, T, T] attention
    matrices and [T, p*p*D] head outputs to 1/chunks of them; the result is the same up to float
    rounding (chunks = 1 is the plain, unchunked program). `chunks` must divide sqrt(K) / p.
    """

    def __init__(self, codebook_size: int, code_dim: int, preset: BridgePreset, *, head_init_std: float = 0.0,
                 chunks: int = 1, dtype=jnp.float32, rngs: nnx.Rngs):
        self.side = grid_side(codebook_size, preset.patch, chunks)
        self.code_dim = code_dim
        self.patch = preset.patch
        self.chunks = chunks
        p, width = preset.patch, preset.width
        # Xavier on the (H, D*p*p) view of the kernel: fan_in = p*p*D, fan_out = H.
        self.patch_embed = nnx.Conv(
            code_dim, width, (p, p), strides=(p, p), padding="VALID",
            kernel_init=nnx.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
            bias_init=zeros, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([
            BridgeBlock(width, preset.num_heads, preset.mlp_ratio, attention_chunks=chunks, dtype=dtype, rngs=rngs)
            for _ in range(preset.depth)])
        head_init = nnx.initializers.normal(head_init_std) if head_init_std else zeros
        self.head = nnx.Linear(width, p * p * code_dim, kernel_init=head_init, bias_init=zeros, dtype=dtype, rngs=rngs)

    def __call__(self, embedding: jax.Array) -> jax.Array:
        """embedding: [K, D] raw codebook -> [K, D] bridged codebook (same row-major order)."""
        s, d, c = self.side, self.code_dim, self.chunks
        # A band of grid rows is a contiguous block of codes, and its patches a contiguous run of tokens.
        if c == 1:
            x = self._embed(embedding.reshape(1, s, s, d))
        else:
            # Unrolled: a scan would take the raw codebook (a jit argument) as its input and copy it.
            bands = embedding.reshape(c, 1, s // c, s, d)
            x = jnp.concatenate([self._embed(bands[i]) for i in range(c)], axis=1)
        for block in self.blocks:
            x = block(x)
        if c == 1:
            return self._recover(x)
        # A scan stacks the bands' codes straight into the [K, D] codebook; the head runs one band at a time.
        return jax.lax.map(self._recover, x.reshape(c, 1, -1, x.shape[-1])).reshape(s * s, d)

    def _embed(self, grid_rows: jax.Array) -> jax.Array:
        """grid_rows: [1, rows, s, D] -> tokens [1, rows / p * s / p, H] (row-major patches)."""
        x = self.patch_embed(grid_rows)  # [1, rows / p, s / p, H]
        return x.reshape(1, -1, x.shape[-1])

    def _recover(self, x: jax.Array) -> jax.Array:
        """x: [1, T', H] tokens of whole patch rows -> their codes [T' * p * p, D] in row-major order."""
        p, d, n = self.patch, self.code_dim, self.side // self.patch
        x = self.head(plain_layer_norm(x))  # [1, T', p*p*D], laid out (row-in-patch, col-in-patch, D)
        x = x.reshape(-1, n, p, p, d).transpose(0, 2, 1, 3, 4)  # [T'/n, p, n, p, D] = grid rows, grid cols
        return x.reshape(-1, d)


class Identity(nnx.Module):
    """The "none" projector: the raw codebook is searched directly (plain VQ)."""

    def __call__(self, embedding: jax.Array) -> jax.Array:
        return embedding


class LinearProjector(nnx.Module):
    """`num_layers` D x D Linear layers with ReLU between (lin/1 is SimVQ-like, lin/5 an MLP).

    Initialised as torch.nn.Linear's defaults (kernel and bias U(+-1/sqrt(D))), as the ablation
    baselines the paper compares with were run in PyTorch; only VQBridge has the paper's own init.
    """

    def __init__(self, code_dim: int, num_layers: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.layers = nnx.List([
            nnx.Linear(code_dim, code_dim, kernel_init=torch_kernel_init, bias_init=torch_bias_init(code_dim),
                       dtype=dtype, rngs=rngs)
            for _ in range(num_layers)])

    def __call__(self, embedding: jax.Array) -> jax.Array:
        x = embedding
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(jax.nn.relu(x))
        return x


def make_projector(name: str, codebook_size: int, code_dim: int, *, bridge_head_init_std: float = 0.0,
                   bridge_chunks: int = 1, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
    """The projector called `name` (see module docstring) for a [K, D] codebook.

    dtype: the projector's compute dtype (its activations); parameters stay float32.
    bridge_chunks: `VQBridge`'s chunks (VQBridge presets only).
    """
    if name == "none":
        return Identity()
    if name in ("lin/1", "lin/5"):
        return LinearProjector(code_dim, int(name[-1]), dtype=dtype, rngs=rngs)
    return VQBridge(codebook_size, code_dim, BRIDGE_PRESETS[name], head_init_std=bridge_head_init_std,
                    chunks=bridge_chunks, dtype=dtype, rngs=rngs)

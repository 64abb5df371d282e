"""The LlamaGen class-conditional GPT: RMSNorm, SwiGLU, 2-D rotary embedding, a class token. Flax NNX.

A sequence is [class token, t_0 ... t_{N-2}] for N = grid * grid codes in row-major order; the logits
at position p predict t_p, so the class position predicts t_0 and the targets are t_0 ... t_{N-1}.
Parameter names and layouts map one to one onto the reference state dict (conversion/gpt.py).

Numerics: parameters float32; matmuls in the compute dtype (`dtype`, float32 or bfloat16); RMSNorm,
rotary, attention softmax statistics and logits in float32; the residual stream stays float32 (as in
the reference under autocast, where the float32 embeddings promote every residual add).

The blocks run as a Python loop over a list of blocks (parameters `layers/<i>/...`) or, with
`scan_layers`, as one scan over a single block whose parameters are stacked [n_layer, ...] (logical axis
"layers"): one compiled block whatever the depth. `remat` names what a block keeps for the backward
pass (REMAT_POLICIES). `stack_layers` / `unstack_layers` convert saved parameters between the two layouts.

Sampling uses `init_cache` + `decode`: a fixed-shape KV cache that a jitted loop carries, one position per call
(position 0 consumes the class label). Each layer has its own k and v arrays [B, H, N, hd], heads before
positions, so a step's attention reads each head's keys and values as one contiguous block in place (a cache
stacked over the layers is sliced per layer, and on XLA's CPU backend a slice is a copy: one of the whole cache
per step); a step writes its slot at `position` in place (dynamic_update_slice). The decode runs the blocks in a
Python loop in both layouts: a scanned GPT decodes through `looped()`, its stacked weights sliced into one block
per layer once, before the sampler's loop, not at every step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.sharding import constrain, logical_axes_of

normal_002 = nnx.initializers.normal(0.02)
zeros = nnx.initializers.zeros_init()

BLD = ("act_batch", "act_length", "act_embed")
BLHD = ("act_batch", "act_length", "act_heads", None)


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of k that is >= n."""
    return n if n % k == 0 else n + k - n % k


@dataclasses.dataclass(frozen=True)
class GPTSize:
    dim: int
    n_layer: int
    n_head: int


# The paper's sizes, plus CPU-sized ones: GPT-tiny (the torch fixture's shape: head_dim 16) for tests, and
# GPT-S for the CPU default run (5.1M parameters in the blocks, head_dim 32: 8 rotary frequencies per axis).
GPT_PRESETS: dict[str, GPTSize] = {
    "GPT-tiny": GPTSize(dim=64, n_layer=2, n_head=4),
    "GPT-S": GPTSize(dim=256, n_layer=6, n_head=8),
    "GPT-B": GPTSize(dim=768, n_layer=12, n_head=12),
    "GPT-L": GPTSize(dim=1024, n_layer=24, n_head=16),
    "GPT-XL": GPTSize(dim=1280, n_layer=36, n_head=20),
    "GPT-XXL": GPTSize(dim=1536, n_layer=48, n_head=24),
    "GPT-3B": GPTSize(dim=3200, n_layer=24, n_head=32),
}
CUSTOM = "custom"  # the preset of a GPT whose sizes are all given (an imported model of another shape)

# What stays of each block's activations for the backward pass (MaxText's `remat_policy` names none and full,
# JAX's dots_saveable policy): none = all of them (nothing recomputed); full = only the block's input (the whole
# block recomputed); dots_saveable = the matmul outputs (norms, rotary, softmax and SwiGLU recomputed).
REMAT_POLICIES = {"none": None, "full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTConfig(config_lib.Spec):
    """The `model` block of a GPT config resolved (`GPTConfig.from_config(config.model, "model")`): every field
    is checked here and only here. The defaults are LlamaGen's (its c2i `ModelArgs`), which is also what an
    imported reference checkpoint is built with; configs/gpt.py writes its block from them (`model_block`).

    dim, n_layer, n_head None: the preset's; ffn_dim None: find_multiple(int(8 * dim / 3), 256). vocab_size (the
    tokenizer's K), num_classes and grid (the token grid side: N = grid * grid codes per image) come from the
    codes' manifest. The null class (CFG) is row num_classes of the class table. remat: a REMAT_POLICIES name.
    scan_layers: the blocks' parameters stacked [n_layer, ...] and run by one scanned block (one compiled block
    whatever the depth: configs/gpt.py:paper); False: a list of blocks run in a Python loop (parameters
    `layers/<i>/...`), the layout of everything saved before scanning existed, and of the local default run,
    whose logged gradient norms the scan changes in the last bit (see README).
    """

    vocab_size: int
    num_classes: int
    grid: int
    preset: str = CUSTOM
    dim: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    ffn_dim: int | None = None
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    class_dropout: float = 0.1  # labels replaced by the null class: trains the unconditional model for CFG
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    remat: str = "none"
    scan_layers: bool = config_lib.later(False)

    def __post_init__(self):
        config_lib.require_choice(self.preset, "preset", tuple(GPT_PRESETS) + (CUSTOM,))
        size = GPT_PRESETS.get(self.preset)
        for name in ("dim", "n_layer", "n_head"):
            if getattr(self, name) is None and size is not None:
                object.__setattr__(self, name, getattr(size, name))
        for name in ("dim", "n_layer", "n_head", "vocab_size", "num_classes", "grid"):
            config_lib.require_number(getattr(self, name), name, integer=True)
        config_lib.require(self.dim % self.n_head == 0, "n_head",
                           f"GPT dim {self.dim} is not divisible by n_head {self.n_head}")
        config_lib.require(self.head_dim % 4 == 0, "n_head",
                           f"GPT head_dim {self.head_dim} (dim / n_head) must be a multiple of 4: the 2-D rotary "
                           "embedding gives a quarter of each head to row and a quarter to column frequencies")
        if self.ffn_dim is None:
            object.__setattr__(self, "ffn_dim", find_multiple(int(2 * 4 * self.dim / 3), 256))
        config_lib.require_number(self.ffn_dim, "ffn_dim", integer=True)
        for name in ("token_dropout", "resid_dropout", "ffn_dropout", "class_dropout"):
            value = getattr(self, name)
            config_lib.require(isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0,
                               name, f"must lie in [0, 1), got {value!r}")
        config_lib.require_number(self.rope_base, "rope_base")
        config_lib.require_number(self.norm_eps, "norm_eps")
        config_lib.require_choice(self.remat, "remat", tuple(REMAT_POLICIES))
        config_lib.require(isinstance(self.scan_layers, bool), "scan_layers",
                           f"must be true or false, got {self.scan_layers!r}")

    @classmethod
    def from_config(cls, block, prefix: str = "", **overrides) -> "GPTConfig":
        """The spec of a `model` block, read through `upgraded_block` (a block saved by an older version too)."""
        return super().from_config(upgraded_block(block), prefix, **overrides)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def seq_len(self) -> int:
        """N: positions per sequence (the class token plus N - 1 codes in, N logits out)."""
        return self.grid * self.grid

    @property
    def null_class(self) -> int:
        return self.num_classes


def upgraded_block(block) -> dict:
    """A `model` block (ConfigDict or dict) in today's fields: one saved before a field existed gets its
    `GPTConfig.later_fields` value (scan_layers: False, the looped layers it was saved with), and one saved
    before remat policies says remat true / false: "full" / "none"."""
    block = {**GPTConfig.later_fields(),
             **(block.to_dict() if isinstance(block, ml_collections.ConfigDict) else block)}
    if isinstance(block.get("remat"), bool):
        block["remat"] = "full" if block["remat"] else "none"
    return block


def stack_layers(params: dict) -> dict:
    """A GPT's parameters (nested like `nnx.to_pure_dict`) from the looped layout, {"layers": {0: block, 1: block,
    ...}, ...}, to the scanned one, {"layers": block with every array stacked [n_layer, ...], ...}; the rest as is.
    numpy arrays stay numpy, jax arrays jax (and abstract ones abstract under jax.eval_shape)."""
    def stack(*arrays):
        return (np.stack if isinstance(arrays[0], np.ndarray) else jnp.stack)(arrays)

    layers = params["layers"]
    return {**params, "layers": jax.tree.map(stack, *(layers[i] for i in range(len(layers))))}


def unstack_layers(params: dict) -> dict:
    """The inverse of `stack_layers`: the scanned layout's [n_layer, ...] arrays -> one block per layer."""
    layers = params["layers"]
    n_layer = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": {i: jax.tree.map(lambda x: x[i], layers) for i in range(n_layer)}}


def model_block(**values) -> dict:
    """The `model` block of a GPT config (configs/gpt.py): every GPTConfig field at its default (None, typed int,
    where the preset or the codes fill it in), then `values`."""
    block = {}
    for field in dataclasses.fields(GPTConfig):
        default = None if field.default is dataclasses.MISSING else field.default
        block[field.name] = ml_collections.config_dict.placeholder(int) if default is None else default
    unknown = sorted(set(values) - set(block))
    if unknown:
        raise ValueError(f"not GPTConfig fields: {unknown}")
    return {**block, **values}


def num_params(config: GPTConfig) -> int:
    """Parameter count: embeddings + output layer + n_layer blocks (4 dim^2 attention, 3 dim ffn SwiGLU, 2 norms)
    + the final norm."""
    d = config.dim
    block = 4 * d * d + 3 * d * config.ffn_dim + 2 * d
    return 2 * config.vocab_size * d + (config.num_classes + 1) * d + config.n_layer * block + d


# ----------------------------------------------------------------------------- pure pieces


def rope_table(grid: int, head_dim: int, base: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each [grid * grid, head_dim / 2] float32: the 2-D rotary table for positions 0 ... N-1.

    Position 0 is the class token: cos AND sin are zero there (the reference's table), which zeroes its
    q and k. Position p >= 1 holds code p - 1 at (r, c) = divmod(p - 1, grid); its angles are
    [r f_0 .. r f_{hd/4-1}, c f_0 .. c f_{hd/4-1}] with f_j = base^(-2j / (hd/2)).
    """
    quarter = head_dim // 4
    freqs = 1.0 / base ** (np.arange(quarter, dtype=np.float64) * 2 / (head_dim // 2))
    cells = np.arange(grid * grid - 1)
    rows, cols = cells // grid, cells % grid
    angles = np.concatenate([np.outer(rows, freqs), np.outer(cols, freqs)], axis=1)  # [N - 1, hd/2]
    cos = np.concatenate([np.zeros((1, 2 * quarter)), np.cos(angles)]).astype(np.float32)
    sin = np.concatenate([np.zeros((1, 2 * quarter)), np.sin(angles)]).astype(np.float32)
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate adjacent channel pairs (2m, 2m+1) by the table's angles, in float32.

    x: [B, T, H, hd]; cos, sin: [T, hd/2] -> [B, T, H, hd] in x's dtype.
    """
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when key is None (evaluation) or rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


# ----------------------------------------------------------------------------- modules


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) * scale, in float32; the result in the compute dtype."""

    def __init__(self, dim: int, *, eps: float, dtype):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(self.dtype)


class Attention(nnx.Module):
    """Causal multi-head self-attention with the 2-D rotary embedding; no biases, no attention dropout."""

    def __init__(self, dim: int, n_head: int, *, dtype, rngs: nnx.Rngs):
        head_dim = dim // n_head
        common = dict(use_bias=False, kernel_init=normal_002, dtype=dtype, rngs=rngs)
        # [dim, 3, H, hd]: the reference's [3 dim, dim] weight (q, k, v stacked, heads contiguous), transposed.
        self.wqkv = nnx.LinearGeneral(dim, (3, n_head, head_dim), **common,
                                      kernel_metadata={"logical_axes": ("embed", "qkv", "heads", "head_dim")})
        self.wo = nnx.LinearGeneral((n_head, head_dim), dim, axis=(-2, -1), **common,
                                    kernel_metadata={"logical_axes": ("heads", "head_dim", "embed")})

    def _qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """x: [B, T, dim] -> q, k, v [B, T, H, hd], q and k rotated."""
        qkv = self.wqkv(x)
        q, k, v = (constrain(qkv[:, :, i], BLHD) for i in range(3))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x: [B, T, dim]; cos, sin: [T, hd/2] -> [B, T, dim]."""
        q, k, v = self._qkv(x, cos, sin)
        return self.wo(constrain(jax.nn.dot_product_attention(q, k, v, is_causal=True), BLHD))

    def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
               position: jax.Array):
        """One position against this layer's cache. x: [B, 1, dim]; cos, sin: [1, hd/2]; cache_k, cache_v:
        [B, H, N, hd] -> (out [B, 1, dim], cache_k, cache_v with slot `position` written in place).

        The arithmetic of `jax.nn.dot_product_attention` (float32 logits scaled by 1/sqrt(hd), softmax in float32,
        probabilities in the cache's dtype), written as two einsums over the cache as it lies: that function
        wants [B, N, H, hd] and transposes the whole cache at every position. Slots after `position` (not written
        yet) are masked."""
        q, k, v = self._qkv(x, cos, sin)
        slot = (0, 0, position, 0)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.transpose(0, 2, 1, 3).astype(cache_k.dtype), slot)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.transpose(0, 2, 1, 3).astype(cache_v.dtype), slot)
        logits = jnp.einsum("bhd,bhnd->bhn", q[:, 0], cache_k.astype(q.dtype), preferred_element_type=jnp.float32)
        logits = logits * jnp.float32(1 / np.sqrt(q.shape[-1]))
        logits = jnp.where(jnp.arange(cache_k.shape[2]) <= position, logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1).astype(cache_v.dtype)
        out = jnp.einsum("bhn,bhnd->bhd", probs, cache_v).astype(q.dtype)[:, None]
        return self.wo(out), cache_k, cache_v


class FeedForward(nnx.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, ffn_dim: int, *, dtype, rngs: nnx.Rngs):
        common = dict(use_bias=False, kernel_init=normal_002, dtype=dtype, rngs=rngs)
        self.w1 = nnx.Linear(dim, ffn_dim, **common, kernel_metadata={"logical_axes": ("embed", "mlp")})
        self.w3 = nnx.Linear(dim, ffn_dim, **common, kernel_metadata={"logical_axes": ("embed", "mlp")})
        self.w2 = nnx.Linear(ffn_dim, dim, **common, kernel_metadata={"logical_axes": ("mlp", "embed")})

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, dim] -> [B, T, dim]."""
        hidden = constrain(nnx.silu(self.w1(x)) * self.w3(x), ("act_batch", "act_length", "act_mlp"))
        return self.w2(hidden)


class Block(nnx.Module):
    """h + drop(attention(norm(h))); h + drop(ffn(norm(h)))."""

    def __init__(self, config: GPTConfig, *, dtype, rngs: nnx.Rngs):
        self.resid_dropout = config.resid_dropout
        self.ffn_dropout = config.ffn_dropout
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps, dtype=dtype)
        self.attention = Attention(config.dim, config.n_head, dtype=dtype, rngs=rngs)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps, dtype=dtype)
        self.feed_forward = FeedForward(config.dim, config.ffn_dim, dtype=dtype, rngs=rngs)

    def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
        """h: [B, T, dim] float32 -> [B, T, dim] float32; dropout_key None: deterministic."""
        keys = (None, None) if dropout_key is None else (jax.random.fold_in(dropout_key, 0),
                                                         jax.random.fold_in(dropout_key, 1))
        h = h + dropout(self.attention(self.attention_norm(h), cos, sin), self.resid_dropout, keys[0])
        h = h + dropout(self.feed_forward(self.ffn_norm(h)), self.ffn_dropout, keys[1])
        return constrain(h, BLD)

    def decode(self, h, cos, sin, cache_k, cache_v, position):
        """Block.__call__ for one position, without dropout (see Attention.decode)."""
        out, cache_k, cache_v = self.attention.decode(self.attention_norm(h), cos, sin, cache_k, cache_v, position)
        h = h + out
        return h + self.feed_forward(self.ffn_norm(h)), cache_k, cache_v


def _stacked(blocks: list[Block]) -> Block:
    """One Block holding the blocks' parameters stacked [n_layer, ...], their logical axes led by "layers"."""
    def stack(*variables: nnx.Variable) -> nnx.Variable:
        first = variables[0]
        return first.replace(jnp.stack([v[...] for v in variables]),
                             logical_axes=("layers",) + logical_axes_of(first))

    states = [nnx.state(block) for block in blocks]
    stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(nnx.graphdef(blocks[0]), stacked)


class GPT(nnx.Module):
    """Class-conditional autoregressive transformer over a grid x grid code sequence."""

    def __init__(self, config: GPTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        d = config.dim
        self.tok_embeddings = nnx.Embed(config.vocab_size, d, embedding_init=normal_002, rngs=rngs,
                                        embedding_metadata={"logical_axes": ("vocab", "embed")})
        self.cls_embedding = nnx.Embed(config.num_classes + 1, d, embedding_init=normal_002, rngs=rngs,
                                       embedding_metadata={"logical_axes": ("classes", "embed")})
        # Built one by one in both layouts, so a scanned GPT starts from the looped one's initial weights.
        blocks = [Block(config, dtype=dtype, rngs=rngs) for _ in range(config.n_layer)]
        self.layers = _stacked(blocks) if config.scan_layers else nnx.List(blocks)
        self.norm = RMSNorm(d, eps=config.norm_eps, dtype=dtype)
        self.output = nnx.Linear(d, config.vocab_size, use_bias=False, kernel_init=zeros, dtype=dtype,
                                 preferred_element_type=jnp.float32, rngs=rngs,
                                 kernel_metadata={"logical_axes": ("embed", "vocab")})

    def _over_layers(self, fn, carry, xs, remat: str = "none"):
        """carry = fn(block i, carry, xs[i]) for i = 0 ... n_layer - 1, each call rematerialised by the
        REMAT_POLICIES `remat`: one jax.lax.scan over the stacked block (one compiled block), or a Python loop over
        the list of blocks. xs: arrays (or None) leading with [n_layer].

        The scan runs over the block's split state, merging the block inside each step, not through nnx.scan: an
        nnx transform refuses a module of an enclosing trace, and the naive sampler's jitted loop calls
        `hidden_states` on a model merged outside its loop body."""
        scan = self.config.scan_layers

        def step(graph, state, carry, x):
            return fn(nnx.merge(graph, state), carry, x)

        if remat != "none":  # inside a scan, the loop already keeps XLA from merging the recomputation away
            step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=not scan, static_argnums=(0,))
        if scan:
            graph, state = nnx.split(self.layers)
            return jax.lax.scan(lambda c, layer: (step(graph, layer[0], c, layer[1]), None), carry, (state, xs))[0]
        for i, block in enumerate(self.layers):
            carry = step(*nnx.split(block), carry, jax.tree.map(lambda x: x[i], xs))
        return carry

    def _rope(self) -> tuple[jax.Array, jax.Array]:
        c = self.config
        return tuple(jnp.asarray(t) for t in rope_table(c.grid, c.head_dim, c.rope_base))

    def hidden_states(self, tokens: jax.Array, labels: jax.Array, *, train: bool = False,
                      dropout_key: jax.Array | None = None) -> jax.Array:
        """tokens: [B, T - 1] codes (T <= N), labels: [B] -> final-normed hidden states [B, T, dim].

        train=True applies class, token, residual and FFN dropout, all drawn from `dropout_key`.
        """
        c = self.config
        if tokens.shape[1] + 1 > c.seq_len:
            raise ValueError(f"{tokens.shape[1]} tokens + the class token exceed the {c.seq_len} positions")
        key = None
        if train and max(c.class_dropout, c.token_dropout, c.resid_dropout, c.ffn_dropout) > 0:
            if dropout_key is None:
                raise ValueError("train=True with non-zero dropout needs a dropout_key")
            key = dropout_key
        if key is not None and c.class_dropout > 0:
            drop = jax.random.bernoulli(jax.random.fold_in(key, 0), c.class_dropout, labels.shape)
            labels = jnp.where(drop, c.null_class, labels)
        h = jnp.concatenate([self.cls_embedding(labels)[:, None], self.tok_embeddings(tokens)], axis=1)
        h = constrain(dropout(h, c.token_dropout, None if key is None else jax.random.fold_in(key, 1)), BLD)
        t = h.shape[1]
        cos, sin = (x[:t] for x in self._rope())
        # Block i draws its dropout from fold_in(fold_in(key, 2), i).
        keys = None if key is None else jax.vmap(jax.random.fold_in, (None, 0))(
            jax.random.fold_in(key, 2), jnp.arange(c.n_layer))
        h = self._over_layers(lambda block, h, block_key: block(h, cos, sin, block_key), h, keys, c.remat)
        return self.norm(h)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: [..., dim] -> float32 logits [..., K]."""
        return self.output(hidden)

    def __call__(self, tokens: jax.Array, labels: jax.Array, *, train: bool = False,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """tokens: [B, T - 1], labels: [B] -> logits [B, T, K] float32 (position 0 predicts t_0)."""
        hidden = self.hidden_states(tokens, labels, train=train, dropout_key=dropout_key)
        return constrain(self.logits(hidden), ("act_batch", "act_length", "act_vocab"))

    # ------------------------------------------------------------------------- sampling

    def looped(self) -> "GPT":
        """This GPT with its blocks in the looped layout: itself when it is looped; a scanned GPT's stacked weights
        sliced into one block per layer (arrays of the same values; under a trace, copies made where this is
        called). The sampler calls it once before its loop over the positions, so that the decode reads each
        layer's weights as they lie, not sliced out of the stack at every step."""
        if not self.config.scan_layers:
            return self
        config = dataclasses.replace(self.config, scan_layers=False)
        graph, state = nnx.split(nnx.eval_shape(lambda: GPT(config, dtype=self.dtype, rngs=nnx.Rngs(0))))
        nnx.replace_by_pure_dict(state, unstack_layers(nnx.to_pure_dict(nnx.state(self))))
        return nnx.merge(graph, state)

    def init_cache(self, batch_size: int, dtype=None) -> dict[str, tuple[jax.Array, ...]]:
        """An empty KV cache: {"k", "v"}: one array per layer, [B, H, N, hd], in `dtype` (default: the compute
        dtype)."""
        c = self.config
        shape = (batch_size, c.n_head, c.seq_len, c.head_dim)
        dtype = self.dtype if dtype is None else dtype
        return {name: tuple(jnp.zeros(shape, dtype) for _ in range(c.n_layer)) for name in ("k", "v")}

    def decode(self, ids: jax.Array, position: jax.Array, cache: dict[str, tuple[jax.Array, ...]]):
        """One causal step. ids: [B] class labels at position 0, else the code at sequence `position` (t_{p-1});
        position: scalar int (may be traced); cache: `init_cache`'s -> (logits [B, K] float32 for t_position, the
        updated cache). A scanned GPT decodes as `looped()` (call that once outside a loop over positions)."""
        if self.config.scan_layers:
            return self.looped().decode(ids, position, cache)
        first = position == 0
        # Both lookups stay in range whichever table the ids belong to; the select keeps the right one.
        h = jnp.where(first, self.cls_embedding(jnp.where(first, ids, 0)),
                      self.tok_embeddings(jnp.where(first, 0, ids)))[:, None]
        cos, sin = (jax.lax.dynamic_slice_in_dim(x, position, 1) for x in self._rope())
        keys, values = [], []
        for block, cache_k, cache_v in zip(self.layers, cache["k"], cache["v"]):
            h, cache_k, cache_v = block.decode(h, cos, sin, cache_k, cache_v, position)
            keys.append(cache_k)
            values.append(cache_v)
        return self.logits(self.norm(h))[:, 0], {"k": tuple(keys), "v": tuple(values)}

"""Class-conditional sampling from a GPT: classifier-free guidance, temperature, top-k / top-p, KV cache.

`generation_fn` runs prefill (the class token) and every decode step in one jitted function: a
lax.fori_loop over the N positions carrying a fixed-shape KV cache (`decoding_fns` splits the same loop into
a start and position ranges, which is how the server reports progress). `use_cache=False` recomputes the
whole prefix at every step without a cache (the baseline; both emit the same tokens).

Settings: the numbers (temperature, top-k, top-p, CFG scale, schedule and interval) are per-sample traced
inputs (`Settings`, one row per sample), so one compiled sampler serves every setting, and samples with
different settings share a batch. What stays static is the structure: whether the batch carries the
null-class rows that CFG needs (`guided`) and the cache.

Randomness: one key per sample, `index_keys(seed, index)` = fold_in(key(seed), global sample index), and
position t draws with fold_in(sample_key, t). A sample's tokens therefore depend on (seed, its index, its
settings) only, never on the batch, its other rows or the device count.

CFG runs the conditional and the null-class sequences as one batch of 2B and mixes
uncond + (cond - uncond) * scale; where guidance is off (scale 1) the conditional logits pass unchanged,
as in the reference, which does not mix there. Scales below 1 are refused (`SamplingConfig`): LlamaGen
guides only above 1 and samples unguided otherwise, and a scale in (0, 1) would blend towards the
unconditional model, which nothing here is tuned or tested for.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.models.gpt import GPT
from fvq_jax.sharding import constrain

CFG_SCHEDULES = ("constant", "linear")


@dataclasses.dataclass(frozen=True)
class SamplingConfig(config_lib.Spec):
    """One sampling setting. temperature 0 or top_k 1: greedy (argmax). top_k 0 and top_p 1.0: no filtering.

    cfg_scale >= 1; 1: no CFG. cfg_schedule "linear" ramps the scale from 1 at the first position to cfg_scale
    at the last; cfg_interval (start, end), 0 <= start <= end <= 1, are fractions of the positions
    (t / (N - 1)) outside which guidance is off.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    cfg_schedule: str = "constant"
    cfg_interval: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        config_lib.require_number(self.temperature, "temperature", strict=False)
        config_lib.require_number(self.top_k, "top_k", strict=False, integer=True)
        config_lib.require_number(self.top_p, "top_p")
        config_lib.require(self.top_p <= 1.0, "top_p", f"must be in (0, 1] (1 = off), got {self.top_p}")
        config_lib.require_number(self.cfg_scale, "cfg_scale", minimum=1.0, strict=False)
        config_lib.require_choice(self.cfg_schedule, "cfg_schedule", CFG_SCHEDULES)
        interval = tuple(self.cfg_interval) if isinstance(self.cfg_interval, (list, tuple)) else ()
        config_lib.require(
            len(interval) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in interval)
            and 0.0 <= interval[0] <= interval[1] <= 1.0, "cfg_interval",
            f"must be (start, end) with 0 <= start <= end <= 1, got {self.cfg_interval!r}")
        object.__setattr__(self, "cfg_interval", tuple(float(x) for x in interval))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def rows(self, count: int) -> Settings:
        """These settings for `count` samples (numpy)."""
        return settings_of([self] * count)


class Settings(NamedTuple):
    """Per-sample sampling settings, each [B]: what `SamplingConfig` holds, as arrays a jitted sampler traces."""

    temperature: jax.Array  # float32
    top_k: jax.Array  # int32
    top_p: jax.Array  # float32
    cfg_scale: jax.Array  # float32
    cfg_linear: jax.Array  # bool: the linear schedule
    cfg_start: jax.Array  # float32
    cfg_end: jax.Array  # float32


def settings_of(configs: Sequence[SamplingConfig]) -> Settings:
    """numpy Settings [len(configs)], row i from configs[i]."""
    return Settings(
        temperature=np.array([c.temperature for c in configs], np.float32),
        top_k=np.array([c.top_k for c in configs], np.int32),
        top_p=np.array([c.top_p for c in configs], np.float32),
        cfg_scale=np.array([c.cfg_scale for c in configs], np.float32),
        cfg_linear=np.array([c.cfg_schedule == "linear" for c in configs], bool),
        cfg_start=np.array([c.cfg_interval[0] for c in configs], np.float32),
        cfg_end=np.array([c.cfg_interval[1] for c in configs], np.float32))


def check_labels(labels, num_classes: int, *, allow_null: bool = False, field: str = "labels") -> np.ndarray:
    """labels as int32 numpy; ValueError naming `field` for a label outside 0 ... num_classes - 1 (the null
    class num_classes, which samples unconditionally, only with allow_null)."""
    labels = np.asarray(labels)
    top = num_classes if allow_null else num_classes - 1
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{field}: must be a 1-D array of integer class ids, got {labels.dtype} {labels.shape}")
    bad = labels[(labels < 0) | (labels > top)]
    if bad.size:
        null = f" (the null class {num_classes} only where asked for: allow_null)" if not allow_null else ""
        raise ValueError(f"{field}: classes must be in 0 ... {top}{null}; got {sorted(set(bad.tolist()))[:8]}")
    return labels.astype(np.int32)


# ----------------------------------------------------------------------------- pure pieces


def cfg_mix(cond_logits: jax.Array, uncond_logits: jax.Array, scale) -> jax.Array:
    """uncond + (cond - uncond) * scale (the reference's formula). [..., K] -> [..., K]."""
    return uncond_logits + (cond_logits - uncond_logits) * scale


def cfg_scale_at(position, num_positions: int, scale, linear=False, start=0.0, end=1.0) -> jax.Array:
    """The guidance scale at `position` (0 ... num_positions - 1; may be traced), float32, shaped like `scale`.

    With f = position / (num_positions - 1): constant gives `scale`, `linear` 1 + (scale - 1) f; outside
    start <= f <= end the scale is 1 (guidance off). scale, linear, start, end: scalars or [B].
    """
    frac = jnp.asarray(position, jnp.float32) / max(num_positions - 1, 1)
    scale = jnp.asarray(scale, jnp.float32)
    value = jnp.where(linear, 1.0 + (scale - 1.0) * frac, scale)
    return jnp.where((frac >= start) & (frac <= end), value, 1.0).astype(jnp.float32)


def _per_row(value, logits: jax.Array) -> jax.Array:
    """A scalar or per-row setting [...] as [..., 1] against logits [..., K]."""
    return jnp.broadcast_to(jnp.asarray(value), logits.shape[:-1])[..., None]


def filter_logits(logits: jax.Array, temperature=1.0, top_k=0, top_p=1.0) -> jax.Array:
    """logits / temperature, then top-k, then top-p; removed tokens get -inf. [..., K] -> [..., K] float32.

    temperature, top_k, top_p: scalars or one per row ([...]; traced). top-k (0: off) keeps every logit >= the
    k-th largest (ties at the threshold stay, as in the reference). top-p (1: off) keeps the smallest prefix of
    the tokens sorted by probability (ties: lower index first) whose probability reaches p, so always at least
    the most likely token. A temperature of 0 (greedy, see `next_tokens`) leaves the logits unscaled. Each
    filter runs only when some row uses it.
    """
    logits = logits.astype(jnp.float32)
    temperature, top_k, top_p = (_per_row(x, logits) for x in (temperature, top_k, top_p))
    logits = logits / jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)

    def keep_top_k(logits):
        k = jnp.clip(top_k, 1, logits.shape[-1])
        kth = jnp.take_along_axis(-jnp.sort(-logits, axis=-1), k - 1, axis=-1)
        return jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)

    def keep_top_p(logits):
        order = jnp.argsort(-logits, axis=-1, stable=True)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
        remove = jnp.take_along_axis(before >= top_p, jnp.argsort(order, axis=-1), axis=-1)
        # A rounded cumulative sum can reach 1 before the last token: top_p = 1 must not cut there.
        return jnp.where(remove & (top_p < 1.0), -jnp.inf, logits)

    logits = jax.lax.cond(jnp.any(top_k > 0), keep_top_k, lambda x: x, logits)
    return jax.lax.cond(jnp.any(top_p < 1.0), keep_top_p, lambda x: x, logits)


def index_keys(seed, indices) -> jax.Array:
    """fold_in(key(seed), index) for each index; seed: an int or one per index ([B], 0 <= seed < 2**31)."""
    indices = jnp.asarray(indices)
    seeds = jnp.broadcast_to(jnp.asarray(seed, jnp.int32), indices.shape)
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, indices)


def sample_keys(seed: int, first_index: int, count: int) -> jax.Array:
    """[count] keys for the samples with global indices first_index ... first_index + count - 1."""
    return index_keys(seed, first_index + jnp.arange(count))


def next_tokens(logits: jax.Array, keys: jax.Array, position, settings: Settings) -> jax.Array:
    """One token per row. logits: [B, K] (guided already), keys: [B] per-sample keys -> [B] int32; greedy rows
    (temperature 0 or top_k 1) take the argmax."""
    greedy = (settings.temperature == 0) | (settings.top_k == 1)
    filtered = filter_logits(logits, settings.temperature, settings.top_k, settings.top_p)
    draw = jax.vmap(lambda key, row: jax.random.categorical(jax.random.fold_in(key, position), row))
    return jnp.where(greedy, jnp.argmax(logits, axis=-1), draw(keys, filtered)).astype(jnp.int32)


def guide(logits: jax.Array, position, num_positions: int, settings: Settings, guided: bool) -> jax.Array:
    """logits [2B, K] (conditional rows first) -> guided [B, K]; the identity on [B, K] when not `guided`."""
    if not guided:
        return logits
    cond, uncond = jnp.split(logits, 2)
    scale = cfg_scale_at(position, num_positions, settings.cfg_scale, settings.cfg_linear, settings.cfg_start,
                         settings.cfg_end)[:, None]
    return jnp.where(scale == 1.0, cond, cfg_mix(cond, uncond, scale))


# ----------------------------------------------------------------------------- samplers


def decoding_fns(graphdef: nnx.GraphDef, *, guided: bool, use_cache: bool = True):
    """The sampling loop in two pure pieces, to jit with shardings:

      start(params, labels [B]) -> state (codes so far [B, N] int32, the KV cache);
      advance(params, state, labels, keys [B], settings, first, stop) -> state with positions first ... stop - 1
          sampled (first, stop: ints, may be traced).

    `guided` adds the null-class rows CFG needs; without them every row's cfg_scale must be 1 (callers derive
    `guided` from the settings). use_cache=False recomputes the whole prefix each step (the baseline). The batch
    dimension of the tokens and the cache is pinned to the data axes (`act_batch`) when traced under
    sharding.axis_rules, so each device samples its own rows.
    """

    def rows_of(model: GPT, labels):
        return jnp.concatenate([labels, jnp.full_like(labels, model.config.null_class)]) if guided else labels

    def start(params, labels):
        model: GPT = nnx.merge(graphdef, params)
        b, n = labels.shape[0], model.config.seq_len
        cache = None
        if use_cache:
            cache = jax.tree.map(lambda x: constrain(x, ("act_batch", "act_heads", None, None)),
                                 model.init_cache(rows_of(model, labels).shape[0]))
        return constrain(jnp.zeros((b, n), jnp.int32), ("act_batch", None)), cache

    def advance(params, state, labels, keys, settings: Settings, first, stop):
        model: GPT = nnx.merge(graphdef, params)
        b, n = labels.shape[0], model.config.seq_len
        classes = rows_of(model, labels)
        rows = classes.shape[0]
        decoder = model.looped()  # a scanned GPT's weights unstacked here, once per call, not at every step

        def cached_logits(t, tokens, cache):
            previous = jax.lax.dynamic_index_in_dim(tokens, jnp.maximum(t - 1, 0), axis=1, keepdims=False)
            ids = jnp.where(t == 0, classes, jnp.tile(previous, rows // b))
            return decoder.decode(ids, t, cache)

        def naive_logits(t, tokens, cache):
            # Positions after t hold placeholders; causality keeps them out of position t.
            hidden = model.hidden_states(jnp.tile(tokens[:, :-1], (rows // b, 1)), classes)
            return model.logits(jax.lax.dynamic_index_in_dim(hidden, t, axis=1, keepdims=False)), cache

        step_logits = cached_logits if use_cache else naive_logits

        def step(t, carry):
            tokens, cache = carry
            logits, cache = step_logits(t, tokens, cache)
            token = next_tokens(guide(logits, t, n, settings, guided), keys, t, settings)
            tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, t, axis=1)
            return constrain(tokens, ("act_batch", None)), cache

        return jax.lax.fori_loop(first, stop, step, state)

    return start, advance


def generation_fn(graphdef: nnx.GraphDef, *, guided: bool, use_cache: bool = True):
    """The pure sampling function (params, labels [B], keys [B], settings) -> codes [B, N] int32: every position
    of `decoding_fns` in one loop."""
    start, advance = decoding_fns(graphdef, guided=guided, use_cache=use_cache)

    def generate(params, labels, keys, settings: Settings):
        n = nnx.merge(graphdef, params).config.seq_len
        return advance(params, start(params, labels), labels, keys, settings, 0, n)[0]

    return generate


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _generate(graphdef, params, labels, keys, settings, guided: bool, use_cache: bool):
    return generation_fn(graphdef, guided=guided, use_cache=use_cache)(params, labels, keys, settings)


def sample_tokens(model: GPT, labels, keys: jax.Array, config: SamplingConfig, *, allow_null: bool = False
                  ) -> jax.Array:
    """labels: [B] classes in 0 ... num_classes - 1 (the null class num_classes, unconditional, only with
    allow_null), keys: [B] per-sample keys (see `sample_keys`) -> codes [B, N] int32, row-major."""
    return _sample(model, labels, keys, config, allow_null, use_cache=True)


def sample_tokens_naive(model: GPT, labels, keys: jax.Array, config: SamplingConfig, *, allow_null: bool = False
                        ) -> jax.Array:
    """`sample_tokens` without a KV cache: every step reruns the full causal forward (the baseline)."""
    return _sample(model, labels, keys, config, allow_null, use_cache=False)


def _sample(model: GPT, labels, keys, config: SamplingConfig, allow_null: bool, *, use_cache: bool) -> jax.Array:
    labels = check_labels(labels, model.config.num_classes, allow_null=allow_null)
    graphdef, params = nnx.split(model)
    return _generate(graphdef, params, jnp.asarray(labels), keys, config.rows(labels.size), config.guided, use_cache)

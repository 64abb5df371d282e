"""Class-conditional sampling from a GPT: classifier-free guidance, temperature, top-k / top-p, KV cache.

`sample_tokens` runs prefill (the class token) and every decode step in one jitted function: a
lax.fori_loop over the N positions carrying a fixed-shape KV cache. `sample_tokens_naive` is the same
loop recomputing the whole prefix without a cache (the baseline; both emit the same tokens).

Randomness: the caller passes one key per sample, `sample_keys(seed, first_index, count)` =
fold_in(key(seed), global sample index), and position t draws with fold_in(sample_key, t). A sample's
tokens therefore depend on (seed, its index) only, never on the batch size or the device count.

CFG runs the conditional and the null-class sequences as one batch of 2B and mixes
uncond + (cond - uncond) * scale; where guidance is off (scale 1) the conditional logits pass unchanged,
as in the reference, which does not mix there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fvq_jax.models.gpt import GPT
from fvq_jax.sharding import constrain

CFG_SCHEDULES = ("constant", "linear")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 or top_k 1: greedy (argmax). top_k 0 and top_p 1.0: no filtering. cfg_scale 1: no CFG.

    cfg_schedule "linear" ramps the scale from 1 at the first position to cfg_scale at the last;
    cfg_interval (start, end) are fractions of the positions (t / (N - 1)) outside which guidance is off.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    cfg_schedule: str = "constant"
    cfg_interval: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}")
        object.__setattr__(self, "cfg_interval", tuple(self.cfg_interval))
        if len(self.cfg_interval) != 2 or self.cfg_interval[0] > self.cfg_interval[1]:
            raise ValueError(f"cfg_interval must be (start, end) with start <= end, got {self.cfg_interval}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


# ----------------------------------------------------------------------------- pure pieces


def cfg_mix(cond_logits: jax.Array, uncond_logits: jax.Array, scale) -> jax.Array:
    """uncond + (cond - uncond) * scale (the reference's formula). [..., K] -> [..., K]."""
    return uncond_logits + (cond_logits - uncond_logits) * scale


def cfg_scale_at(position, num_positions: int, scale: float, schedule: str = "constant",
                 interval: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
    """The guidance scale at `position` (0 ... num_positions - 1; may be traced), float32 scalar.

    With f = position / (num_positions - 1): "constant" gives `scale`, "linear" 1 + (scale - 1) f;
    outside start <= f <= end the scale is 1 (guidance off).
    """
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")
    frac = jnp.asarray(position, jnp.float32) / max(num_positions - 1, 1)
    value = jnp.float32(scale) if schedule == "constant" else 1.0 + (scale - 1.0) * frac
    return jnp.where((frac >= interval[0]) & (frac <= interval[1]), value, 1.0).astype(jnp.float32)


def filter_logits(logits: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """logits / temperature, then top-k, then top-p; removed tokens get -inf. [..., K] -> [..., K] float32.

    top-k keeps every logit >= the k-th largest (ties at the threshold stay, as in the reference).
    top-p keeps the smallest prefix of the tokens sorted by probability (ties: lower index first) whose
    probability reaches p, so always at least the most likely token.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 here, got {temperature} (temperature 0 is greedy: argmax)")
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1, stable=True)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
        remove_sorted = before >= top_p
        remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
        logits = jnp.where(remove, -jnp.inf, logits)
    return logits


def sample_keys(seed: int, first_index: int, count: int) -> jax.Array:
    """[count] keys for the samples with global indices first_index ... first_index + count - 1."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(first_index + jnp.arange(count))


def next_tokens(logits: jax.Array, keys: jax.Array, position, config: SamplingConfig) -> jax.Array:
    """One token per row. logits: [B, K] (guided already), keys: [B] per-sample keys -> [B] int32."""
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, config.temperature, config.top_k, config.top_p)
    draw = jax.vmap(lambda key, row: jax.random.categorical(jax.random.fold_in(key, position), row))
    return draw(keys, filtered).astype(jnp.int32)


def guide(logits: jax.Array, position, num_positions: int, config: SamplingConfig) -> jax.Array:
    """logits [2B, K] (conditional rows first) -> guided [B, K]; the identity on [B, K] without CFG."""
    if not config.guided:
        return logits
    cond, uncond = jnp.split(logits, 2)
    scale = cfg_scale_at(position, num_positions, config.cfg_scale, config.cfg_schedule, config.cfg_interval)
    return jnp.where(scale == 1.0, cond, cfg_mix(cond, uncond, scale))


# ----------------------------------------------------------------------------- samplers


def generation_fn(graphdef: nnx.GraphDef, config: SamplingConfig, *, use_cache: bool = True):
    """The pure sampling function (params, labels [B], keys [B]) -> codes [B, N] int32, to jit with shardings.

    Prefill and every decode step run in one lax.fori_loop; use_cache=False recomputes the whole prefix
    each step (the baseline). The batch dimension of the tokens and the cache is pinned to the data axes
    (`act_batch`) when traced under sharding.axis_rules, so each device samples its own rows.
    """

    def generate(params, labels, keys):
        model: GPT = nnx.merge(graphdef, params)
        b, n = labels.shape[0], model.config.seq_len
        classes = jnp.concatenate([labels, jnp.full_like(labels, model.config.null_class)]) if config.guided else labels
        rows = classes.shape[0]

        def cached_logits(t, tokens, cache):
            previous = jax.lax.dynamic_index_in_dim(tokens, jnp.maximum(t - 1, 0), axis=1, keepdims=False)
            ids = jnp.where(t == 0, classes, jnp.tile(previous, rows // b))
            return model.decode(ids, t, cache)

        def naive_logits(t, tokens, cache):
            # Positions after t hold placeholders; causality keeps them out of position t.
            hidden = model.hidden_states(jnp.tile(tokens[:, :-1], (rows // b, 1)), classes)
            return model.logits(jax.lax.dynamic_index_in_dim(hidden, t, axis=1, keepdims=False)), cache

        step_logits = cached_logits if use_cache else naive_logits

        def step(t, carry):
            tokens, cache = carry
            logits, cache = step_logits(t, tokens, cache)
            token = next_tokens(guide(logits, t, n, config), keys, t, config)
            tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, t, axis=1)
            return constrain(tokens, ("act_batch", None)), cache

        cache = None
        if use_cache:
            cache = jax.tree.map(lambda x: constrain(x, (None, "act_batch", None, "act_heads", None)),
                                 model.init_cache(rows))
        tokens = constrain(jnp.zeros((b, n), jnp.int32), ("act_batch", None))
        tokens, _ = jax.lax.fori_loop(0, n, step, (tokens, cache))
        return tokens

    return generate


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _generate(graphdef, params, labels, keys, config: SamplingConfig, use_cache: bool):
    return generation_fn(graphdef, config, use_cache=use_cache)(params, labels, keys)


def sample_tokens(model: GPT, labels: jax.Array, keys: jax.Array, config: SamplingConfig) -> jax.Array:
    """labels: [B] classes, keys: [B] per-sample keys (see `sample_keys`) -> codes [B, N] int32, row-major."""
    graphdef, params = nnx.split(model)
    return _generate(graphdef, params, labels, keys, config, True)


def sample_tokens_naive(model: GPT, labels: jax.Array, keys: jax.Array, config: SamplingConfig) -> jax.Array:
    """`sample_tokens` without a KV cache: every step reruns the full causal forward (the baseline)."""
    graphdef, params = nnx.split(model)
    return _generate(graphdef, params, labels, keys, config, False)

"""Sampling: CFG mixing and schedules, temperature / top-k / top-p against numpy; the KV-cache sampler
against the naive one and a step-by-step reference; per-sample keys independent of the batch size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvq_jax.sampling import sampler
from fvq_jax.sampling.sampler import SamplingConfig
from tests.models.tiny_gpt import TINY, forward, random_gpt


@pytest.fixture(scope="module")
def model():
    return random_gpt(seed=1)


# ----------------------------------------------------------------------------- pure pieces


def test_cfg_mix():
    rng = np.random.default_rng(0)
    cond, uncond = rng.normal(size=(2, 3, 7)).astype(np.float32)
    got = sampler.cfg_mix(jnp.asarray(cond), jnp.asarray(uncond), 1.75)
    np.testing.assert_allclose(np.asarray(got), uncond + (cond - uncond) * 1.75, rtol=1e-6, atol=1e-6)


def _np_scale(t, n, scale, schedule, interval):
    f = t / (n - 1)
    if not interval[0] <= f <= interval[1]:
        return 1.0
    return scale if schedule == "constant" else 1 + (scale - 1) * f


@pytest.mark.parametrize("schedule", ["constant", "linear"])
@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.2, 0.6)])
def test_cfg_scale_at(schedule, interval):
    n = 16
    got = jax.jit(jax.vmap(lambda t: sampler.cfg_scale_at(t, n, 3.0, schedule, interval)))(jnp.arange(n))
    want = [_np_scale(t, n, 3.0, schedule, interval) for t in range(n)]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    if schedule == "linear" and interval == (0.0, 1.0):
        assert float(got[0]) == 1.0 and float(got[-1]) == 3.0


def _np_filter(logits, temperature, top_k, top_p):
    """Row by row: divide, keep logits >= the k-th largest, then the most likely tokens (ties: lower index
    first) until their probability reaches top_p."""
    out = logits.astype(np.float64) / temperature
    for row in out.reshape(-1, out.shape[-1]):
        if top_k > 0:
            kth = np.sort(row)[::-1][min(top_k, row.size) - 1]
            row[row < kth] = -np.inf
        if top_p < 1.0:
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            order = sorted(range(row.size), key=lambda i: (-row[i], i))
            kept, total = [], 0.0
            for i in order:
                kept.append(i)
                total += probs[i]
                if total >= top_p:
                    break
            removed = np.ones(row.size, bool)
            removed[kept] = False
            row[removed] = -np.inf
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.8), (1.3, 10, 0.6),
                                                     (1.0, 1, 1.0), (1.0, 100, 0.01)])
def test_filter_logits_matches_numpy(temperature, top_k, top_p):
    logits = np.random.default_rng(1).normal(size=(4, 3, 50)).astype(np.float32) * 2
    got = np.asarray(jax.jit(sampler.filter_logits, static_argnums=(1, 2, 3))(jnp.asarray(logits), temperature,
                                                                               top_k, top_p))
    want = _np_filter(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)
    assert np.isfinite(got).any(axis=-1).all()  # at least one token survives


def test_filter_logits_ties_and_the_exact_top_p_boundary():
    ties = jnp.asarray([[2.0, 2.0, 1.0, 1.0, 0.0]])
    # The most likely token already holds 0.35 >= 0.3; of the two tied ones the lower index stays.
    np.testing.assert_array_equal(np.isfinite(sampler.filter_logits(ties, top_p=0.3)), [[1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np.isfinite(sampler.filter_logits(ties, top_p=0.5)), [[1, 1, 0, 0, 0]])
    # Four tokens of 1/4: two of them reach 0.5 exactly, and that is enough.
    np.testing.assert_array_equal(np.isfinite(sampler.filter_logits(jnp.zeros((1, 4)), top_p=0.5)), [[1, 1, 0, 0]])
    # top-k keeps every logit tied with the k-th largest.
    np.testing.assert_array_equal(np.isfinite(sampler.filter_logits(jnp.asarray([[3.0, 1, 3, 3]]), top_k=2)),
                                  [[1, 0, 1, 1]])


def test_sampling_config_checks():
    for bad in (dict(top_p=0.0), dict(top_k=-1), dict(temperature=-1.0), dict(cfg_schedule="cosine"),
                dict(cfg_interval=(0.8, 0.2))):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
    with pytest.raises(ValueError, match="greedy"):
        sampler.filter_logits(jnp.zeros((1, 4)), temperature=0.0)
    assert SamplingConfig(temperature=0.0).greedy and SamplingConfig(top_k=1).greedy
    assert not SamplingConfig(top_k=2).greedy and not SamplingConfig().guided


def test_sample_keys_are_fold_ins_of_the_global_index():
    keys = sampler.sample_keys(3, 10, 4)
    for i in range(4):
        np.testing.assert_array_equal(jax.random.key_data(keys[i]),
                                      jax.random.key_data(jax.random.fold_in(jax.random.key(3), 10 + i)))


# ----------------------------------------------------------------------------- samplers

LABELS = jnp.asarray([0, 3, 4, 1], jnp.int32)
CONFIGS = {
    "greedy": SamplingConfig(top_k=1),
    "greedy_cfg": SamplingConfig(top_k=1, cfg_scale=2.0),
    "sampled": SamplingConfig(temperature=1.0),
    "topk_topp_cfg_linear": SamplingConfig(temperature=1.0, top_k=20, top_p=0.8, cfg_scale=3.0,
                                           cfg_schedule="linear", cfg_interval=(0.1, 0.7)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_sampler_emits_the_naive_samplers_tokens(model, name):
    """Exact equality is safe here: the two paths' logits differ by ~1e-6, while the draws' margins are
    clear (measured: >= 1.3e-3 between the two best Gumbel-perturbed logits, >= 7e-5 between a cumulative
    probability and top_p)."""
    keys = sampler.sample_keys(0, 0, LABELS.shape[0])
    cached = np.asarray(sampler.sample_tokens(model, LABELS, keys, CONFIGS[name]))
    naive = np.asarray(sampler.sample_tokens_naive(model, LABELS, keys, CONFIGS[name]))
    assert cached.shape == (4, TINY.seq_len) and cached.dtype == np.int32
    assert ((0 <= cached) & (cached < TINY.vocab_size)).all()
    np.testing.assert_array_equal(cached, naive)
    if not CONFIGS[name].greedy:
        other = np.asarray(sampler.sample_tokens(model, LABELS, sampler.sample_keys(1, 0, 4), CONFIGS[name]))
        assert (other != cached).mean() > 0.3  # the keys drive the draws


def _guided_logits(model, tokens, labels, scale):
    """The step reference: full forwards of the conditional and the null-class batch, mixed in numpy."""
    cond = np.asarray(forward(model, tokens, labels), np.float64)
    uncond = np.asarray(forward(model, tokens, jnp.full_like(labels, TINY.null_class)), np.float64)
    return uncond + (cond - uncond) * scale


def test_greedy_cfg_equals_a_step_by_step_argmax(model):
    tokens = np.zeros((4, TINY.seq_len), np.int32)
    for t in range(TINY.seq_len):
        logits = _guided_logits(model, jnp.asarray(tokens[:, :-1]), LABELS, 2.0)
        tokens[:, t] = logits[:, t].argmax(-1)
    got = sampler.sample_tokens(model, LABELS, sampler.sample_keys(0, 0, 4), CONFIGS["greedy_cfg"])
    np.testing.assert_array_equal(np.asarray(got), tokens)
    assert len(np.unique(tokens)) > 8  # not a degenerate model


def test_sampled_tokens_come_from_the_top_k_of_the_guided_logits(model):
    config = SamplingConfig(top_k=3, cfg_scale=1.5)
    tokens = np.asarray(sampler.sample_tokens(model, LABELS, sampler.sample_keys(5, 0, 4), config))
    logits = _guided_logits(model, jnp.asarray(tokens[:, :-1]), LABELS, 1.5)  # the same prefixes, by causality
    rank = (logits > np.take_along_axis(logits, tokens[..., None], -1)).sum(-1)
    assert (rank < 3).all() and (rank > 0).any()


def test_samples_do_not_depend_on_the_batch_size(model):
    config = CONFIGS["topk_topp_cfg_linear"]
    labels = jnp.asarray([0, 1, 2, 3, 4, 2], jnp.int32)
    whole = sampler.sample_tokens(model, labels, sampler.sample_keys(7, 0, 6), config)
    parts = [sampler.sample_tokens(model, labels[:2], sampler.sample_keys(7, 0, 2), config),
             sampler.sample_tokens(model, labels[2:], sampler.sample_keys(7, 2, 4), config)]
    np.testing.assert_array_equal(np.asarray(whole), np.concatenate([np.asarray(p) for p in parts]))


def test_temperature_zero_is_greedy(model):
    keys = sampler.sample_keys(0, 0, 4)
    greedy = sampler.sample_tokens(model, LABELS, keys, CONFIGS["greedy"])
    np.testing.assert_array_equal(np.asarray(sampler.sample_tokens(model, LABELS, sampler.sample_keys(9, 0, 4),
                                                                   SamplingConfig(temperature=0.0))),
                                  np.asarray(greedy))

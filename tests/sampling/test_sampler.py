"""Sampling: CFG mixing and schedules, temperature / top-k / top-p against numpy; the KV-cache sampler
against the naive one and a step-by-step reference; per-sample keys independent of the batch size; per-sample
settings (traced) against the sampler with static settings that came before them (core_sampler_tokens.npz)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.sampling import sampler
from fvq_jax.sampling.sampler import SamplingConfig
from tests.models.tiny_gpt import TINY, fixture_gpt, forward, random_gpt


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
    got = jax.jit(jax.vmap(lambda t: sampler.cfg_scale_at(t, n, 3.0, schedule == "linear", *interval)))(jnp.arange(n))
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
    got = np.asarray(jax.jit(sampler.filter_logits)(jnp.asarray(logits), temperature, top_k, top_p))
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


def test_filter_logits_takes_one_setting_per_row():
    logits = np.random.default_rng(2).normal(size=(3, 40)).astype(np.float32) * 2
    settings = [(0.7, 5, 1.0), (1.0, 0, 0.8), (1.3, 10, 0.6)]
    got = np.asarray(jax.jit(sampler.filter_logits)(jnp.asarray(logits), *map(jnp.asarray, zip(*settings))))
    for row, (temperature, top_k, top_p) in enumerate(settings):
        want = _np_filter(logits[row:row + 1], temperature, top_k, top_p)[0]
        np.testing.assert_array_equal(np.isinf(got[row]), np.isinf(want))
        np.testing.assert_allclose(got[row][~np.isinf(want)], want[~np.isinf(want)], rtol=1e-6)


def test_sampling_config_checks():
    for bad, field in ((dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
                       (dict(top_k=2.5), "top_k"), (dict(temperature=-1.0), "temperature"),
                       (dict(temperature=float("nan")), "temperature"), (dict(cfg_schedule="cosine"), "cfg_schedule"),
                       (dict(cfg_interval=(0.8, 0.2)), "cfg_interval"), (dict(cfg_interval=(0.0, 1.5)), "cfg_interval"),
                       (dict(cfg_scale=-1.0), "cfg_scale"), (dict(cfg_scale=0.5), "cfg_scale"),
                       (dict(cfg_scale=float("inf")), "cfg_scale")):
        with pytest.raises(config_lib.ConfigError, match=f"^config field {field}: "):
            SamplingConfig(**bad)
    with pytest.raises(config_lib.ConfigError, match="config field sample.cfg_scale: must be a number >= 1.0"):
        SamplingConfig.from_config(dict(cfg_scale=-1.0), "sample")
    assert SamplingConfig(temperature=0.0).greedy and SamplingConfig(top_k=1).greedy
    assert not SamplingConfig(top_k=2).greedy and not SamplingConfig().guided
    assert SamplingConfig(cfg_interval=[0, 1]).cfg_interval == (0.0, 1.0)


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


def test_labels_out_of_range_are_refused(model):
    """Today the null class (5) samples unconditionally without a word, larger ids give all-zero codes and -1 the
    last class: refused, the null class only where asked for."""
    keys = sampler.sample_keys(0, 0, 2)
    for bad in ([0, 5], [0, 6], [-1, 0]):
        with pytest.raises(ValueError, match=r"labels: classes must be in 0 ... 4"):
            sampler.sample_tokens(model, jnp.asarray(bad), keys, CONFIGS["greedy"])
    with pytest.raises(ValueError, match="labels: must be a 1-D array of integer"):
        sampler.sample_tokens(model, np.array([0.0, 1.0]), keys, CONFIGS["greedy"])
    unconditional = sampler.sample_tokens(model, jnp.asarray([5, 5]), keys, CONFIGS["greedy"], allow_null=True)
    tokens = np.zeros((1, TINY.seq_len), np.int32)
    for t in range(TINY.seq_len):  # the null class's own greedy continuation
        tokens[:, t] = np.asarray(forward(model, jnp.asarray(tokens[:, :-1]), jnp.asarray([5])))[:, t].argmax(-1)
    np.testing.assert_array_equal(np.asarray(unconditional), np.repeat(tokens, 2, axis=0))


CORE = pathlib.Path(__file__).with_name("core_sampler_tokens.npz")
# The settings of CORE's rows. CORE holds what the sampler with static settings (commit a6bc22a,
# fvq_jax/sampling/sampler.py: SamplingConfig compiled into the program) sampled for them with
# sample_tokens(fixture_gpt(), labels, sample_keys(11, 100, 8), SamplingConfig(**settings)).
CORE_SETTINGS = {
    "greedy": dict(top_k=1),
    "greedy_cfg2.5": dict(top_k=1, cfg_scale=2.5),
    "t1": dict(temperature=1.0),
    "t0.7_k20": dict(temperature=0.7, top_k=20),
    "p0.8_cfg3_linear_interval": dict(top_p=0.8, cfg_scale=3.0, cfg_schedule="linear", cfg_interval=(0.1, 0.7)),
    "cfg1.75_k50_p0.95": dict(cfg_scale=1.75, top_k=50, top_p=0.95),
    "t1.3_cfg4": dict(temperature=1.3, cfg_scale=4.0),
    "cfg2.3_linear_t0.9": dict(temperature=0.9, cfg_scale=2.3, cfg_schedule="linear"),
}


def test_traced_settings_sample_what_the_static_sampler_sampled():
    """Each setting alone, and all of them as the rows of one guided batch (settings traced per sample: the
    server's case), give the tokens the sampler with compiled-in settings gave."""
    gpt = fixture_gpt()
    with np.load(CORE) as data:
        core = {k: data[k] for k in data.files}
    labels = core["labels"]
    for name, settings in CORE_SETTINGS.items():
        got = sampler.sample_tokens(gpt, labels, sampler.sample_keys(11, 100, 8), SamplingConfig(**settings))
        np.testing.assert_array_equal(np.asarray(got), core[name], err_msg=name)
    names = list(CORE_SETTINGS)
    # Row r of the mixed batch: sample r % 8 of setting r // 8 (the settings alternate within one program).
    rows = [SamplingConfig(**CORE_SETTINGS[names[r // 8]]) for r in range(8 * len(names))]
    indices = 100 + np.arange(len(rows)) % 8
    graph, params = nnx.split(gpt)
    generate = jax.jit(sampler.generation_fn(graph, guided=True))
    mixed = generate(params, jnp.asarray(labels[indices - 100]), sampler.index_keys(11, indices),
                     sampler.settings_of(rows))
    for i, name in enumerate(names):
        np.testing.assert_array_equal(np.asarray(mixed[8 * i:8 * i + 8]), core[name], err_msg=name)

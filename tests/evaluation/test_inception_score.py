"""Inception Score: closed forms and the split convention of the original code."""

import numpy as np
import pytest

from fvq_jax.evaluation.inception_score import inception_score


def test_uniform_predictions_score_one():
    mean, std = inception_score(np.zeros((50, 1008)))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_peaked_predictions_match_closed_form():
    # Each split holds n samples, each peaked on its own class: p(y|x) = e^m / Z on one class and
    # 1 / Z elsewhere (Z = e^m + C - 1); p(y) = (e^m + n - 1) / (n Z) on the n used classes, 1 / Z
    # on the rest; every sample has the same KL, so IS = exp(KL) in every split.
    classes, n, m, splits = 1008, 20, 6.0, 5
    logits = np.zeros((n * splits, classes))
    logits[np.arange(n * splits), np.tile(np.arange(n), splits)] = m
    z = np.exp(m) + classes - 1
    p_top, p_rest = np.exp(m) / z, 1 / z
    marginal_used = (np.exp(m) + n - 1) / (n * z)
    kl = p_top * np.log(p_top / marginal_used) + (n - 1) * p_rest * np.log(p_rest / marginal_used)
    mean, std = inception_score(logits, splits=splits)
    assert mean == pytest.approx(np.exp(kl), rel=1e-10) and std == pytest.approx(0.0, abs=1e-9)
    assert inception_score(logits * 1e3, splits=splits)[0] == pytest.approx(n, rel=1e-9)  # one-hot: IS = n


def test_split_convention_matches_original_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3, size=(23, 12))  # 23 samples: uneven parts i*N//10 .. (i+1)*N//10
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(10):
        part = probs[i * 23 // 10:(i + 1) * 23 // 10]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    mean, std = inception_score(logits)
    assert mean == pytest.approx(np.mean(scores), rel=1e-12) and std == pytest.approx(np.std(scores), rel=1e-9)


def test_too_few_samples_raise():
    with pytest.raises(ValueError, match="one sample per split"):
        inception_score(np.zeros((5, 10)), splits=10)

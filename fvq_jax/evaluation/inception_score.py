"""Inception Score from the FID Inception's logits, float64 on the host.

IS = exp(E_x KL(p(y|x) || p(y))), with the conventions of the original code (Salimans et al.,
2016) that NVlabs and torch-fidelity reproduce:
- p(y|x) is the softmax over all 1008 outputs of the 2015-12-05 graph (1000 ImageNet classes
  plus 8 unused ones) of the logits *without* the output bias (what `InceptionV3` returns);
- the N samples are cut into `splits` = 10 consecutive parts [i N // splits, (i + 1) N // splits),
  p(y) is the mean of p(y|x) within each part, and the result is the mean and the (ddof = 0)
  standard deviation of the per-part scores.
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, logsumexp


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """logits: [N, C] -> (mean, std) of the per-split scores; 1 (no information) .. C."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, C], got {logits.shape}")
    n = logits.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"need at least one sample per split: {n} samples, {splits} splits")
    log_p = log_softmax(logits, axis=-1)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_marginal = logsumexp(part, axis=0) - np.log(part.shape[0])
        kl = np.sum(np.exp(part) * (part - log_marginal), axis=-1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))

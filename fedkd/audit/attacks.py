"""Membership scores: the logit-scaled confidence and LiRA's likelihood ratio."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import norm


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """phi = log(p_y / (1 - p_y)) per example, computed stably from logits
    (Carlini et al. 2022: this makes the per-example score distributions Gaussian)."""
    logp = torch.log_softmax(logits.double(), dim=1)
    true = logp.gather(1, labels.view(-1, 1)).squeeze(1)
    rest = logp.scatter(1, labels.view(-1, 1), -torch.inf).logsumexp(1)
    return (true - rest).numpy()


def lira_scores(target: np.ndarray, shadow: np.ndarray, shadow_in: np.ndarray) -> np.ndarray:
    """Online LiRA with a global variance per side.

    target: (m,) the target's phi per candidate; shadow: (K, m) each shadow's phi;
    shadow_in: (K, m) bool, whether the candidate was in that shadow's training set.
    Returns log N(target; mu_in, s_in) - log N(target; mu_out, s_out) per candidate:
    higher means "member". With few shadows per-example variances are noise, so one
    variance per side is fitted over all candidates, as Carlini et al. advise; a
    candidate that no shadow saw on one side falls back to that side's global mean.
    """
    shadow_in = shadow_in.astype(bool)
    mu_in = _side_means(shadow, shadow_in)
    mu_out = _side_means(shadow, ~shadow_in)
    s_in = _side_std(shadow, shadow_in, mu_in)
    s_out = _side_std(shadow, ~shadow_in, mu_out)
    return norm.logpdf(target, mu_in, s_in) - norm.logpdf(target, mu_out, s_out)


def _side_means(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    counts = mask.sum(0)
    overall = scores[mask].mean() if mask.any() else 0.0
    sums = np.where(mask, scores, 0.0).sum(0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), overall)


def _side_std(scores: np.ndarray, mask: np.ndarray, means: np.ndarray) -> float:
    residuals = (scores - means[None, :])[mask]
    return float(max(residuals.std(), 1e-6)) if residuals.size > 1 else 1.0

"""How well an attack separates members from non-members, with uncertainty."""

from __future__ import annotations

import numpy as np
from scipy.stats import binom
from sklearn.metrics import roc_auc_score, roc_curve

LOW_FPRS = (0.01, 0.001)


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """The best true-positive rate among thresholds whose false-positive rate is at
    most `fpr` (0 when no threshold gets there)."""
    fprs, tprs, _ = roc_curve(labels, scores)
    ok = fprs <= fpr
    return float(tprs[ok].max()) if ok.any() else 0.0


def attack_summary(
    labels: np.ndarray, scores: np.ndarray, rng: np.random.Generator, bootstrap: int = 200
) -> dict[str, float | list[float]]:
    """ROC AUC and TPR at 1% and 0.1% FPR, each with a 95% percentile-bootstrap
    interval over the candidates (resampled with replacement, both classes kept)."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=float)
    if not np.isfinite(scores).all():
        raise ValueError("attack scores must be finite")

    def stats(lab: np.ndarray, sc: np.ndarray) -> list[float]:
        return [roc_auc_score(lab, sc), *(tpr_at_fpr(lab, sc, f) for f in LOW_FPRS)]

    point = stats(labels, scores)
    members, others = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    draws = []
    for _ in range(bootstrap):
        idx = np.concatenate([rng.choice(members, len(members)), rng.choice(others, len(others))])
        draws.append(stats(labels[idx], scores[idx]))
    low, high = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
    names = ["auc", *(f"tpr_at_{f:g}_fpr" for f in LOW_FPRS)]
    out: dict[str, float | list[float]] = {}
    for i, name in enumerate(names):
        out[name] = float(point[i])
        out[f"{name}_ci"] = [float(low[i]), float(high[i])]
    return out


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses right] for an (eps, delta)-DP mechanism whose m
    canaries were each included with probability 1/2 (Steinke, Nasr and Jagielski,
    "Privacy auditing with one (1) training run", NeurIPS 2023, Theorem 3 and
    Appendix D): a Binomial(r, e^eps / (1 + e^eps)) tail, plus delta's share."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + np.exp(-eps))  # the accuracy of eps-DP randomized response
    tail = binom.sf(v - 1, r, q)  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return float(min(tail, 1.0))
    # alpha = max over i of P[v - i <= Binomial(r, q) < v] / i
    below = np.cumsum(binom.pmf(v - np.arange(1, v + 1), r, q))
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return float(min(tail + alpha * delta * 2 * m, 1.0))


def one_run_epsilon(m: int, r: int, v: int, delta: float, p: float = 0.05) -> float:
    """The largest eps that the guesses refute at confidence 1 - p: the mechanism is
    not (eps, delta)-DP for any smaller eps. 0 when they refute nothing."""
    if one_run_p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(m, r, v, high, delta) < p and high < 100:
        low, high = high, 2 * high
    for _ in range(50):  # bisection: p_value(low) < p <= p_value(high)
        mid = (low + high) / 2
        if one_run_p_value(m, r, v, mid, delta) < p:
            low = mid
        else:
            high = mid
    return low


def one_run_guesses(included: np.ndarray, scores: np.ndarray, per_side: int) -> tuple[int, int]:
    """Guess "in" for the `per_side` highest scores and "out" for as many lowest,
    abstain on the rest; (guesses, correct)."""
    order = np.argsort(scores)
    out, inn = order[:per_side], order[len(order) - per_side :]
    correct = int(included[inn].sum() + (~included[out]).sum())
    return 2 * per_side, correct

"""How well an attack separates members from non-members, with uncertainty."""

from __future__ import annotations

import numpy as np
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

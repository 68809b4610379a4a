"""Knowledge-distillation maths as pure functions (Hinton et al. 2015 and the FD papers).

Shapes: logits and probabilities are (n, C); stacked client knowledge is (K, n, C)
with K clients. Nothing here touches models, data or Flower.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F


def tempered_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """p_k = exp(z_k / tau) / sum_j exp(z_j / tau)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.softmax(logits / temperature, dim=-1)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    temperature: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """tau^2 * KL(p_t || p_s), averaged over the batch (weighted, if `weights` given).

    The tau^2 factor keeps the gradient scale comparable across temperatures.
    """
    log_ps = F.log_softmax(student_logits / temperature, dim=-1)
    if weights is None:
        return temperature**2 * F.kl_div(log_ps, teacher_probs, reduction="batchmean")
    per_sample = F.kl_div(log_ps, teacher_probs, reduction="none").sum(-1)
    return temperature**2 * (weights * per_sample).sum() / weights.sum().clamp_min(1e-12)


def kd_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_probs: torch.Tensor | None,
    alpha: float,
    temperature: float,
    kd_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """alpha * CE(y, softmax(z_s)) + (1 - alpha) * tau^2 * KL(p_t || p_s).

    `kd_logits` are the student's logits on the samples the teacher labelled; they
    default to `student_logits` (same batch). In federated distillation they differ:
    CE is on a private batch, KD on a batch of the public proxy set. Without a
    teacher, the loss is plain CE.
    """
    ce = F.cross_entropy(student_logits, targets)
    if teacher_probs is None:
        return ce
    kd_in = student_logits if kd_logits is None else kd_logits
    return alpha * ce + (1 - alpha) * distillation_loss(kd_in, teacher_probs, temperature)


# --------------------------------------------------------------- aggregation operators


def _weights(k: int, weights: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.full((k,), 1.0 / k, dtype=like.dtype)
    w = weights.to(like.dtype)
    if w.shape != (k,) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be {k} non-negative numbers with a positive sum")
    return w / w.sum()


def mean_logits(logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """FedMD's consensus: the (weighted) mean of the clients' logits, (K, n, C) -> (n, C)."""
    w = _weights(logits.shape[0], weights, logits)
    return torch.einsum("k,knc->nc", w, logits)


def coordinate_median(values: torch.Tensor) -> torch.Tensor:
    """The element-wise median over clients, (K, n, C) -> (n, C): any minority of
    clients, however extreme, cannot move it past the honest values (Yin et al. 2018).
    With an even K it is the mean of the two middle values."""
    return values.quantile(0.5, dim=0)


def trimmed_mean(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """Element-wise mean after dropping the `fraction` largest and smallest values of
    each coordinate across clients (K, n, C) -> (n, C)."""
    k = values.shape[0]
    cut = int(fraction * k)
    if not 0 <= fraction < 0.5 or k - 2 * cut < 1:
        raise ValueError(f"trim fraction must be in [0, 0.5) and keep a client, got {fraction}")
    ordered = values.sort(dim=0).values
    return ordered[cut : k - cut].mean(dim=0)


def mean_probs(probs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The (weighted) mean of probability vectors; stays a distribution."""
    return mean_logits(probs, weights)


def entropy_reduction_average(
    probs: torch.Tensor,
    temperature: float,
    weights: torch.Tensor | None = None,
    center: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] = mean_probs,
) -> torch.Tensor:
    """DS-FL's ERA: softmax(mean_k p_k / T). With T < 1 it sharpens the average.

    Averaging non-IID clients' outputs gives high-entropy targets; ERA lowers the
    entropy so that distilling toward them still teaches a decision. `center` may
    replace the mean with a robust one (a median, a trimmed mean).
    """
    return tempered_softmax(center(probs, weights), temperature)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the rows of `probs`."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()

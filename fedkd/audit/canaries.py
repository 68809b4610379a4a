"""White-box one-run audit of DP-SGD as a client runs it, with Dirac gradient canaries.

DP-SGD's accountant assumes the adversary sees every noisy gradient sum (each step is
a release) and that any per-example gradient of L2 norm at most `max_grad_norm` may
be among them. The audit plays that adversary (Nasr et al., "Tight Auditing of
Differentially Private Machine Learning", USENIX Security 2023):

    canaries   m "gradient examples", each zero but for one coordinate of the
               student's parameters (distinct, seeded, in tensors that hold at least
               1% of them), of value max_grad_norm: a valid clipped per-example
               gradient. Each is in the client's data by a fair coin drawn from the
               audit's seed, so the audit knows the bits.
    training   the target client's own: its shard, the teacher's soft labels on the
               proxy set, DP-SGD with the run's settings for the DP steps it took,
               the secret noise (fedkd/audit/client.py). Each DP step, every included
               canary is Poisson-sampled at the rate q of the real examples (from the
               OS CSPRNG, like theirs) and added to the clipped sum before the noise
               (`StepAudit.inject`, fedkd/privacy/dpsgd.py).
    score      the noisy sum at the canary's coordinate, added over the steps
               (`observe`), less the low-rank part of its layer's summed gradient
               (the real examples'): about q x steps x max_grad_norm higher when
               included.
    test       "in" for the k highest scores, "out" for the k lowest, k fixed in
               advance; the one-run test of Steinke, Nasr and Jagielski (NeurIPS
               2023) turns the number right into an epsilon lower bound at 95%.

The bound is checked against the accountant's epsilon for exactly the DP steps run.
Its ceiling, the bound if every guess were right, is reported beside it: a check can
only fail where that ceiling is above the epsilon checked (5,000 canaries and 250
guesses a side give 4.98 at delta 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedkd.audit.client import ClientRecipe
from fedkd.audit.metrics import one_run_epsilon, one_run_guesses
from fedkd.errors import ConfigError
from fedkd.privacy import gaussian_epsilon
from fedkd.privacy.dpsgd import dp_steps_per_round
from fedkd.privacy.noise import DPNoise
from fedkd.seeding import numpy_rng

SMALLEST = 0.01  # share of the parameters a tensor needs to hold canaries
RANK = 2  # of the real gradients' part taken out of each weight matrix's sums


@dataclass(frozen=True)
class DiracSettings:
    canaries: int = 5000
    guesses: int = 250  # a side: "in" for this many highest scores, "out" for as many lowest
    seed: int = 0
    confidence: float = 0.95


class DiracCanaries:
    """`StepAudit` for `dp_train_student`: injects the included canaries, sums what
    the noisy steps show at their coordinates."""

    def __init__(
        self, params: list[torch.Tensor], count: int, value: float, rate: float, seed: int
    ) -> None:
        sizes = [p.numel() for p in params]
        # coordinates of the tensors holding at least SMALLEST of the parameters: in a
        # small one (a bias, the output layer) every real gradient is concentrated on
        # few entries, and their sum there drowns a canary when the noise is gone
        big = [n if n >= SMALLEST * sum(sizes) else 0 for n in sizes]
        if count > sum(big):
            raise ConfigError("--dirac-canaries", count, f"at most {sum(big)} (the coordinates)")
        pool = np.concatenate([np.arange(n) + sum(sizes[:j]) for j, n in enumerate(big) if n])
        coords = numpy_rng(seed, "audit-dirac-coordinates").choice(pool, count, replace=False)
        self.included = numpy_rng(seed, "audit-dirac-in").random(count) < 0.5
        self.value, self.rate, self.count = value, rate, count
        self.shapes = [p.shape for p in params]
        bounds = np.cumsum([0, *sizes])
        which = np.searchsorted(bounds, coords, side="right") - 1
        self.slots = [  # (parameter, canary ids, flat offsets in it)
            (j, np.flatnonzero(which == j), torch.from_numpy(coords[which == j] - bounds[j]))
            for j in np.unique(which)
        ]
        # the noisy gradient sums of every tensor that holds canaries, over the steps
        self.totals = {j: torch.zeros(self.shapes[j], dtype=torch.float64) for j, *_ in self.slots}
        self.steps = 0
        self.sampler = DPNoise()  # secret, as the real examples' Poisson sample

    def inject(self, params: list[torch.Tensor]) -> None:
        if [p.shape for p in params] != self.shapes:
            raise RuntimeError("the DP optimizer's parameters are not the audited model's")
        sampled = self.sampler.bernoulli(self.count, self.rate).numpy() & self.included
        add = torch.from_numpy(sampled * self.value).float()
        for j, ids, offsets in self.slots:
            params[j].summed_grad.view(-1).index_add_(0, offsets, add[torch.from_numpy(ids)])

    def observe(self, params: list[torch.Tensor]) -> None:
        for j, _, _ in self.slots:
            self.totals[j] += params[j].grad.detach().double()
        self.steps += 1

    def scores(self) -> np.ndarray:
        """Per canary, the noisy sums at its coordinate added over the steps, less the
        rank-RANK part of its weight matrix's summed gradient. The real examples'
        gradients in a layer sum to a matrix close to low rank (outer products along
        a few directions); a canary is one entry of it. Without the noise, those sums
        drowned a few canaries (6 of 500 guesses wrong on the epsilon-4 run's client
        0); with it, the noise dominates and this changes little. Like any score
        computed from what the steps released, it keeps the one-run test valid."""
        out = np.zeros(self.count)
        for j, ids, offsets in self.slots:
            total = self.totals[j].reshape(self.shapes[j][0], -1)
            if min(total.shape) > 4 * RANK:
                u, s, v = torch.linalg.svd(total, full_matrices=False)
                total = total - (u[:, :RANK] * s[:RANK]) @ v[:RANK]
            out[ids] = total.reshape(-1)[offsets].numpy()
        return out


def dirac_audit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: ClientRecipe,
    generator: torch.Generator,
    settings: DiracSettings,
    delta: float,
) -> dict[str, Any]:
    """Train `model` as `recipe` says with Dirac canaries; the one-run bound beside the
    accountant's epsilon for the same DP steps."""
    dp = recipe.dp
    if dp is None:
        raise ConfigError("privacy", "none", "sample (the white-box audit checks DP-SGD)")
    m, k = settings.canaries, settings.guesses
    if not 1 <= k <= m // 2:
        raise ConfigError("--dirac-guesses", k, f"from 1 to half the canaries ({m // 2})")
    q, _ = dp_steps_per_round(len(y), dp.batch_size, dp.epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    canaries = DiracCanaries(params, m, dp.max_grad_norm, q, settings.seed)
    steps = recipe.train(model, x, y, generator, audit=canaries)
    if canaries.steps != steps:
        raise RuntimeError(f"the audit saw {canaries.steps} of {steps} DP steps")
    r, v = one_run_guesses(canaries.included, canaries.scores(), k)
    p = 1 - settings.confidence
    return {
        "audit": "white-box, Dirac gradient canaries (every noisy step observed)",
        "value": one_run_epsilon(m, r, v, delta, p),
        "attainable": one_run_epsilon(m, r, r, delta, p),
        "confidence": settings.confidence,
        "canaries": m,
        "included": int(canaries.included.sum()),
        "guesses": r,
        "correct": v,
        "accountant_epsilon": gaussian_epsilon(dp.noise_multiplier, [(q, steps)], delta),
        "dp_steps": steps,
        "sample_rate": q,
        "noise_multiplier": dp.noise_multiplier,
        "delta": delta,
    }

"""Sample-level DP for local training: DP-SGD with Opacus on the private data.

Each step draws a Poisson sample of the private set (rate q = batch_size / n, so a
step's batch size varies), takes one Opacus DP-SGD step on its cross-entropy
(per-example gradients clipped to `max_grad_norm`, Gaussian noise added), then, when
the server sent soft labels, one ordinary SGD step of KD on a batch of the public
proxy set. Only the DP steps touch private data; the KD steps see public data and
the current model, so they are post-processing. Steps per epoch: round(1 / q).

The private steps have settings of their own (`privacy.batch_size`, `lr`, `epochs`,
`momentum`, `optimizer`; unset ones are `train.*`): DP-SGD wants larger batches and
learning rates than plain SGD. The KD steps keep `train.lr` and `train.momentum`.

The Gaussian noise and the Poisson sample come from `DPNoise` (fedkd/privacy/noise.py):
the OS CSPRNG unless the run asked for replayable noise.

`audit` (fedkd-audit's Dirac canaries, fedkd/audit/canaries.py) sees every step
white-box: `inject(params)` may add to the clipped gradient sums before the noise,
`observe(params)` reads the noisy sums after it. Without one nothing changes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from fedkd.distill import distillation_loss
from fedkd.privacy.noise import DPNoise

if TYPE_CHECKING:
    from fedkd.config import PrivacyConfig
    from fedkd.training import LocalTraining


class StepAudit(Protocol):
    """What `dp_train_student` lets an auditor do at each DP step (white-box)."""

    def inject(self, params: list[torch.Tensor]) -> None: ...

    def observe(self, params: list[torch.Tensor]) -> None: ...


@dataclass(frozen=True)
class DPSGD:
    """The private steps' settings: noise, clip, and their own batch, epochs, optimizer."""

    noise_multiplier: float
    max_grad_norm: float
    batch_size: int  # expected Poisson batch
    epochs: int
    lr: float
    momentum: float = 0.0
    optimizer: str = "sgd"  # sgd | adam

    @classmethod
    def from_config(cls, privacy: PrivacyConfig, hp: LocalTraining) -> DPSGD:
        """`privacy.*`, each unset value taken from the round's local training."""

        def pick(value, default):
            return default if value is None else value

        return cls(
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            batch_size=pick(privacy.batch_size, hp.batch_size),
            epochs=pick(privacy.epochs, hp.epochs),
            lr=pick(privacy.lr, hp.lr),
            momentum=pick(privacy.momentum, hp.momentum),
            optimizer=privacy.optimizer,
        )


def dp_steps_per_round(n: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(sample rate q, DP steps per round) for a private set of n examples."""
    q = min(1.0, batch_size / max(n, 1))
    return q, epochs * max(1, round(1 / q))


def dp_train_student(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    hp,
    dp: DPSGD,
    generator: torch.Generator,
    proxy_x: torch.Tensor | None = None,
    teacher_probs: torch.Tensor | None = None,
    device: str = "cpu",
    noise: DPNoise | None = None,
    audit: StepAudit | None = None,
) -> tuple[float, int]:
    """Train `model` in place; returns (mean private loss, DP steps taken).

    `generator` orders the public proxy batches; `noise` draws the DP noise and the
    Poisson sample (None: the seeded `generator`, replayable); `audit` watches each
    DP step (fedkd-audit only)."""
    noise = noise or DPNoise(generator)
    with warnings.catch_warnings():
        # Opacus' hooks fire on the first layer, whose input needs no gradient: harmless
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        return _dp_train(
            model, x, y, hp, dp, generator, proxy_x, teacher_probs, device, noise, audit
        )


def _dp_train(model, x, y, hp, dp, generator, proxy_x, teacher_probs, device, noise, audit):
    from opacus import GradSampleModule

    model.to(device).train()
    for m in model.modules():  # Opacus' backward hooks cannot see through in-place ops
        if isinstance(m, nn.ReLU):
            m.inplace = False
    gsm = GradSampleModule(model)
    q, steps = dp_steps_per_round(len(y), dp.batch_size, dp.epochs)
    if dp.optimizer == "adam":
        inner = torch.optim.Adam(gsm.parameters(), lr=dp.lr)
    else:
        inner = torch.optim.SGD(gsm.parameters(), lr=dp.lr, momentum=dp.momentum)
    private_opt = _dp_optimizer(inner, dp, max(1, round(q * len(y))), noise)
    if audit is not None:
        _watch(private_opt, audit)
    use_kd = teacher_probs is not None and proxy_x is not None and len(proxy_x) > 0
    public_opt = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum)
    proxy_bs = -(-len(proxy_x) // steps) if use_kd else 0
    porder = torch.randperm(len(proxy_x), generator=generator) if use_kd else None
    total, count = 0.0, 0
    for s in range(steps):
        mask = noise.bernoulli(len(y), q)  # Poisson sampling
        idx = mask.nonzero().flatten()
        private_opt.zero_grad(set_to_none=True)
        out = gsm(x[idx].to(device))
        if len(idx):
            loss = F.cross_entropy(out, y[idx].to(device))
            total += loss.item() * len(idx)
            count += len(idx)
        else:  # an empty Poisson sample: zero gradients, but the step (and its noise) counts
            loss = out.sum() * 0.0
        loss.backward()
        private_opt.step()
        if use_kd:
            j = s % max(1, -(-len(proxy_x) // proxy_bs))
            pidx = porder[j * proxy_bs : (j + 1) * proxy_bs]
            gsm.disable_hooks()
            public_opt.zero_grad(set_to_none=True)
            kd = (1 - hp.alpha) * distillation_loss(
                model(proxy_x[pidx].to(device)), teacher_probs[pidx].to(device), hp.temperature
            )
            kd.backward()
            public_opt.step()
            gsm.enable_hooks()
    private_opt.zero_grad(set_to_none=True)
    for p in model.parameters():  # leave a plain module behind
        for attr in ("grad_sample", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
    gsm._close()
    return total / max(count, 1), steps


def _watch(optimizer, audit: StepAudit) -> None:
    """`audit` around the optimizer's noise: `inject` sees the clipped sums
    (p.summed_grad), `observe` the noisy sums (p.grad, not yet scaled)."""
    add_noise = optimizer.add_noise

    def audited_add_noise() -> None:
        audit.inject(optimizer.params)
        add_noise()
        audit.observe(optimizer.params)

    optimizer.add_noise = audited_add_noise


def _dp_optimizer(optimizer, dp: DPSGD, expected_batch_size: int, noise: DPNoise):
    """Opacus' DPOptimizer, its Gaussian noise drawn from `noise`."""
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    if not noise.secure:  # the seeded stream, as Opacus itself draws it
        return DPOptimizer(
            optimizer,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=expected_batch_size,
            generator=noise.generator,
        )

    class SecretNoiseDPOptimizer(DPOptimizer):
        def add_noise(self) -> None:
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:  # as DPOptimizer.add_noise, with our noise source
                _check_processed_flag(p.summed_grad)
                summed = p.summed_grad
                if std > 0:
                    summed = summed + noise.normal(summed.shape, std).to(summed.device)
                p.grad = summed.view_as(p)
                _mark_as_processed(p.summed_grad)

    return SecretNoiseDPOptimizer(
        optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=expected_batch_size,
    )

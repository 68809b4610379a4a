"""Model inversion: inputs synthesised from a trained classifier alone, for data-free
rehearsal (the `synthetic` source of fedkd/mitigations/student_memory.py).

As in Zero-Shot KD's "data impressions" (Nayak et al., ICML 2019) and the synthetic
replay of data-free class-incremental FL (TARGET, Zhang et al., ICCV 2023), random
inputs are optimised until the model assigns them a sampled soft target over the
classes it should remember; a total-variation and an L2 prior keep them image-like.
fedkd's CNNs have no BatchNorm, so DeepInversion's feature-statistics prior does not
apply. The result is what the model *believes* its classes look like: distilling a
student toward the model's soft labels on these inputs carries the model's decision
function to the student without any real image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class Inversion:
    """How inputs are synthesised (mitigation.synthesis_*)."""

    steps: int = 100  # Adam steps on the inputs
    lr: float = 0.05
    tv_weight: float = 0.05  # total variation: smooth, image-like inputs
    l2_weight: float = 0.001  # small inputs, as the data's are
    concentration: float = 4.0  # Dirichlet weight of an item's own class (diversity)
    batch_size: int = 250  # items optimised together


def soft_targets(
    classes: list[int], n: int, num_classes: int, concentration: float, rng: np.random.Generator
) -> torch.Tensor:
    """n target distributions over `classes`: item i leans to classes[i % len(classes)],
    by a Dirichlet(1 + concentration * onehot) draw (mean weight on its own class
    (1 + c) / (k + c)); zero on every other class."""
    k = len(classes)
    mix = np.zeros((n, k))
    for j in range(k):
        rows = np.arange(j, n, k)
        mix[rows] = rng.dirichlet(1.0 + concentration * np.eye(k)[j], size=len(rows))
    targets = torch.zeros(n, num_classes)
    targets[:, classes] = torch.from_numpy(mix).float()
    return targets


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels, (N, C, H, W) -> scalar."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
    return dh + dw


def invert(
    model: nn.Module,
    targets: torch.Tensor,
    input_shape: tuple[int, ...],
    bounds: tuple[float, float],
    hp: Inversion,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Inputs x (len(targets), *input_shape), within `bounds`, on which `model`'s
    softmax approaches `targets` (KL), under the TV and L2 priors."""
    was_training = model.training
    model.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    out = []
    try:
        for start in range(0, len(targets), hp.batch_size):
            t = targets[start : start + hp.batch_size].to(device)
            x = torch.randn((len(t), *input_shape), generator=generator).to(device)
            x.requires_grad_(True)
            opt = torch.optim.Adam([x], lr=hp.lr)
            for _ in range(hp.steps):
                log_p = F.log_softmax(model(x), dim=1)
                loss = F.kl_div(log_p, t, reduction="batchmean")
                loss = loss + hp.tv_weight * total_variation(x) + hp.l2_weight * x.pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    x.clamp_(*bounds)
            out.append(x.detach().cpu())
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return torch.cat(out)

"""A finished task's inputs, synthesised from the teacher alone: the server half of
student_memory's `synthetic` source (the inversion itself is fedkd/inversion.py).

The teacher's predictions on the task's current public items say which classes it
has learnt there (looked at once, kept nowhere); random inputs are then optimised
until the teacher gives them soft targets over those classes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedkd.inversion import Inversion, invert, soft_targets
from fedkd.seeding import numpy_rng, torch_generator
from fedkd.training import predict_logits

if TYPE_CHECKING:
    from fedkd.data.federated import FederatedData

CLASS_SHARE = 0.05  # a class the teacher predicts on this share of a task's items is its


def learnt_classes(
    teacher: nn.Module, items: torch.Tensor, num_classes: int, device: str
) -> list[int]:
    """The classes the teacher predicts on at least CLASS_SHARE of a task's items."""
    predicted = predict_logits(teacher, items, device=device).argmax(1)
    counts = torch.bincount(predicted, minlength=num_classes)
    return [c for c in range(num_classes) if counts[c] >= CLASS_SHARE * len(predicted)]


def synthesise_task(
    teacher: nn.Module,
    items: torch.Tensor,
    data: FederatedData,
    seed: int,
    task: int,
    count: int,
    steps: int,
    device: str,
) -> tuple[torch.Tensor, list[int]]:
    """`count` inputs for task `task` by `steps` of inversion, seeded by (seed, task),
    and the classes they stand for (`items`: the task's public items)."""
    classes = learnt_classes(teacher, items, data.num_classes, device)
    hp = Inversion(steps=steps)
    targets = soft_targets(
        classes, count, data.num_classes, hp.concentration, numpy_rng(seed, task, "synthesis")
    )
    x = invert(
        teacher,
        targets,
        data.input_shape,
        input_bounds(data),
        hp,
        torch_generator(seed, task, "synthesis"),
        device,
    )
    return x, classes


def input_bounds(data: FederatedData) -> tuple[float, float]:
    """The range of the data's normalised inputs (black and white images)."""
    shape = (1, *data.input_shape)
    black = data.normalize(np.zeros(shape, dtype=np.uint8))
    white = data.normalize(np.full(shape, 255, dtype=np.uint8))
    return float(torch.minimum(black, white).min()), float(torch.maximum(black, white).max())

"""A client's local loss as small pieces that compose.

Each step of local training (fedkd/training.py `train_student`) draws a private
batch and starts the loss at CE(y, student(x)). Every term then folds itself in,
in order: `loss = term.fold(step, loss)`. A term that needs inputs of its own (KD on
proxy items, rehearsal on remembered ones) names them in `items`: the loop draws a
batch of them each step, one pass per epoch, and runs the student on them in the
same forward pass as the private batch (one call, so BatchNorm sees one batch).

A strategy's client half (strategies/client_half.py) returns its terms; mitigations
add theirs (rehearsal, LwF). A new algorithm with its own client loss writes one
term in its own file.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from fedkd.distill import distillation_loss


@dataclass(frozen=True)
class Step:
    """One step of local training, as a term sees it."""

    model: nn.Module
    x: torch.Tensor  # the private batch, on the training device
    y: torch.Tensor
    idx: torch.Tensor  # its rows in the shard the loop trains on
    logits: torch.Tensor  # the student's logits on x
    temperature: float
    rows: torch.Tensor | None = None  # this term's own items this step (None: none)
    out: torch.Tensor | None = None  # the student's logits on them


class LossTerm:
    """One piece of the local loss. A term that draws inputs of its own has a
    field `items` (a tensor of them); `drawn_items` reads it."""

    def during(self, model: nn.Module) -> AbstractContextManager:
        """What the term needs around the training loop (e.g. a forward hook that
        keeps the representation it reads); entered before the first step."""
        return nullcontext()

    def fold(self, step: Step, loss: torch.Tensor) -> torch.Tensor:
        """The loss with this term folded in."""
        raise NotImplementedError


def drawn_items(term: LossTerm) -> torch.Tensor | None:
    """The inputs a term draws a batch of each step, if any."""
    items = getattr(term, "items", None)
    return items if items is not None and len(items) > 0 else None


@dataclass(frozen=True)
class TeacherKD(LossTerm):
    """alpha * loss + (1 - alpha) * tau^2 * KL(teacher || student) on proxy items
    (Hinton et al. 2015): what a soft-label student learns from the teacher. A step
    without proxy items (they ran out this epoch) keeps the loss as it is."""

    items: torch.Tensor
    probs: torch.Tensor  # the teacher's soft labels, one row per item
    alpha: float

    def fold(self, step: Step, loss: torch.Tensor) -> torch.Tensor:
        if step.out is None:
            return loss
        target = self.probs[step.rows].to(step.x.device)
        kd = distillation_loss(step.out, target, step.temperature)
        return self.alpha * loss + (1 - self.alpha) * kd


@dataclass(frozen=True)
class Rehearsal(LossTerm):
    """+ weight * tau^2 * KL on public items with remembered soft labels, which a
    student keeps distilling on while it learns a new task (student_memory)."""

    items: torch.Tensor
    probs: torch.Tensor
    weight: float

    @property
    def x(self) -> torch.Tensor:
        return self.items

    def fold(self, step: Step, loss: torch.Tensor) -> torch.Tensor:
        if step.out is None:
            return loss
        target = self.probs[step.rows].to(step.x.device)
        return loss + self.weight * distillation_loss(step.out, target, step.temperature)


@dataclass(frozen=True)
class SoftTargets(LossTerm):
    """+ weight * tau^2 * KL toward soft labels of the private examples themselves
    (LwF, Li & Hoiem 2016: the client's previous model on its new data)."""

    probs: torch.Tensor  # one row per private example of the shard trained on
    weight: float

    def fold(self, step: Step, loss: torch.Tensor) -> torch.Tensor:
        target = self.probs[step.idx].to(step.x.device)
        return loss + self.weight * distillation_loss(step.logits, target, step.temperature)


@dataclass(frozen=True)
class Proximal(LossTerm):
    """+ mu/2 * ||w - w_start||^2 (FedProx, Li et al. 2020): keeps a client's model
    near where the round started it."""

    start: tuple[torch.Tensor, ...]  # detached copies of the parameters at the start
    mu: float

    @classmethod
    def around(cls, model: nn.Module, mu: float) -> Proximal:
        return cls(tuple(p.detach().clone() for p in model.parameters()), mu)

    def fold(self, step: Step, loss: torch.Tensor) -> torch.Tensor:
        params = step.model.parameters()
        drift = sum(((p - s) ** 2).sum() for p, s in zip(params, self.start, strict=True))
        return loss + self.mu / 2 * drift

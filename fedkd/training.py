"""Training loops shared by clients and the server. Plain tensors, no DataLoader.

Batches are drawn from index permutations of a `torch.Generator`, so a loop's
randomness is a pure function of the generator its caller seeded.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from fedkd.distill import distillation_loss, tempered_softmax
from fedkd.loss_terms import LossTerm, Step, drawn_items

if TYPE_CHECKING:
    from fedkd.config import DistillConfig, TrainConfig


def on_device(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`model.to(device)`, skipped when it is there already: `.to` visits every
    module, which costs as much as a small client's evaluation."""
    first = next(model.parameters(), None)
    if first is None or first.device != torch.device(device):
        model.to(device)
    return model


_SGD: weakref.WeakKeyDictionary[nn.Module, torch.optim.SGD] = weakref.WeakKeyDictionary()


def fresh_sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD over `model`'s parameters with no state (no momentum yet), as a new one
    would be; a module's optimizer is kept and emptied, since building one costs a
    millisecond, a tenth of a small client's round."""
    params = list(model.parameters())
    opt = _SGD.get(model)
    if opt is None or [id(p) for p in opt.param_groups[0]["params"]] != [id(p) for p in params]:
        opt = _SGD[model] = torch.optim.SGD(params, lr=lr)
    opt.state.clear()
    opt.param_groups[0].update(lr=lr, momentum=momentum, weight_decay=weight_decay)
    return opt


@dataclass(frozen=True)
class LocalTraining:
    """Hyper-parameters of one client's local update (sent by the server each round)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    alpha: float = 0.5  # CE weight when a teacher is present
    temperature: float = 3.0
    schedule: str = "joint"  # joint: CE + KD each step; sequential: KD epochs, then CE
    kd_epochs: int = 1  # sequential
    kd_lr: float = 0.1  # sequential
    kd_batch_size: int = 50  # sequential
    kd_shuffle: bool = True  # sequential: reshuffle the proxy items every KD epoch

    @classmethod
    def from_config(cls, train: TrainConfig, distill: DistillConfig) -> LocalTraining:
        """The configured local update: `train.*` plus the KD weight and temperature."""
        return cls(
            epochs=train.epochs,
            batch_size=train.batch_size,
            lr=train.lr,
            momentum=train.momentum,
            weight_decay=train.weight_decay,
            alpha=distill.alpha,
            temperature=distill.temperature,
            schedule=distill.client_schedule,
            kd_epochs=distill.client_epochs,
            kd_lr=distill.client_lr,
            kd_batch_size=distill.client_batch_size,
            kd_shuffle=distill.shuffle,
        )


def train_student(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    hp: LocalTraining,
    generator: torch.Generator,
    terms: Sequence[LossTerm] = (),
    device: torch.device | str = "cpu",
) -> float:
    """CE on private (x, y) with each loss term folded in (fedkd/loss_terms.py);
    returns the mean loss. Without terms this is plain supervised training.

    A term with `items` draws a batch of them each step, sized so that one epoch
    covers them once, and the student sees them in the private batch's forward pass.
    Permutations are drawn private first, then each term's in order, every epoch."""
    on_device(model, device).train()
    opt = fresh_sgd(model, hp.lr, hp.momentum, hp.weight_decay)
    n = len(y)
    steps = max(1, -(-n // hp.batch_size))
    drawn = [t for t in terms if drawn_items(t) is not None]
    sizes = {id(t): -(-len(t.items) // steps) for t in drawn}
    total, count = 0.0, 0
    with ExitStack() as hooks:
        for term in terms:
            hooks.enter_context(term.during(model))
        for _ in range(hp.epochs):
            order = torch.randperm(n, generator=generator)
            orders = {id(t): torch.randperm(len(t.items), generator=generator) for t in drawn}
            for s in range(steps):
                idx = order[s * hp.batch_size : (s + 1) * hp.batch_size]
                if len(idx) == 0:
                    continue
                rows = {
                    id(t): orders[id(t)][s * sizes[id(t)] : (s + 1) * sizes[id(t)]] for t in drawn
                }
                loss = step_loss(model, x[idx].to(device), y[idx].to(device), idx, hp, terms, rows)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                count += len(idx)
    return total / max(count, 1)


def step_loss(
    model: nn.Module,
    xb: torch.Tensor,
    yb: torch.Tensor,
    idx: torch.Tensor,
    hp: LocalTraining,
    terms: Sequence[LossTerm],
    rows: dict[int, torch.Tensor],
) -> torch.Tensor:
    """One step's loss: one forward pass over the private batch and the terms' items
    (those with rows this step), CE on the private part, then every term folded in."""
    batches = [(t, r) for t in terms if len(r := rows.get(id(t), ())) > 0]
    parts = [xb, *(t.items[r].to(xb.device) for t, r in batches)]
    out = model(torch.cat(parts)) if len(parts) > 1 else model(xb)
    logits = out[: len(idx)]
    step = Step(model, xb, yb, idx, logits, hp.temperature)
    own, start = {}, len(idx)
    for t, r in batches:
        own[id(t)] = replace(step, rows=r, out=out[start : start + len(r)])
        start += len(r)
    loss = F.cross_entropy(logits, yb)
    for t in terms:
        loss = t.fold(own.get(id(t), step), loss)
    return loss


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, batch_size: int = 1000, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Logits for `x` in eval mode, batched, on the CPU."""
    on_device(model, device).eval()
    outs = [
        model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)
    ]
    return torch.cat(outs) if outs else torch.empty(0)


def accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 1000,
    device: torch.device | str = "cpu",
) -> float:
    if len(y) == 0:
        return float("nan")
    pred = predict_logits(model, x, batch_size, device).argmax(1)
    return float((pred == y).float().mean())


def distill_to_targets(
    model: nn.Module,
    x: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    temperature: float,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    optimizer: torch.optim.Optimizer | None = None,
    weights: torch.Tensor | None = None,
    shuffle: bool = True,
) -> float:
    """Distill `model` on unlabeled `x` toward `target_probs`; returns mean loss.

    Adam unless an optimizer is given. `weights` weigh samples (e.g. remembered
    proxy items against the current ones). `shuffle=False` takes the items in their
    own order every epoch (the reference DS-FL's unshuffled loaders). This is how
    the server teacher absorbs the aggregated client knowledge.
    """
    on_device(model, device).train()
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    total, count = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
        for s in range(0, len(x), batch_size):
            idx = order[s : s + batch_size]
            w = None if weights is None else weights[idx].to(device)
            out = model(x[idx].to(device))
            loss = distillation_loss(out, target_probs[idx].to(device), temperature, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
    return total / max(count, 1)


def soft_labels(
    model: nn.Module, x: torch.Tensor, temperature: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """softmax(model(x) / tau): what a teacher broadcasts."""
    return tempered_softmax(predict_logits(model, x, device=device), temperature)

"""FD, federated distillation (Jeong et al. 2018, "Communication-Efficient On-Device
Machine Learning: Federated Distillation and Augmentation under Non-IID Private
Data"): knowledge as one mean logit vector per class, no proxy set, no server model.

Client: after local training, the student's mean logits on its own examples of each
class, and how many examples each mean covers (C x C + C numbers: 440 bytes for 10
classes, whatever the model). While training, each private example is also pulled
toward the federation's mean logits for its label:
    loss += beta * tau^2 * KL(softmax(g_y / tau) || softmax(z / tau)).
Server: g_c = the count-weighted mean of the clients' class-c logits; classes no one
holds stay unknown (no pull). A client's share of any class mean is capped
(`max_weight_share`) and logits beyond `max_value` are refused, so one reply cannot
set a class's target (strategies/per_class.py, shared with FedProto). As in PFLlib's
FD, a client's own logits are part of the mean it is pulled toward (the paper's
teacher leaves them out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord

from fedkd.config import require
from fedkd.distill import distillation_loss, tempered_softmax
from fedkd.loss_terms import LossTerm, Step
from fedkd.training import predict_logits
from strategies.base import STRATEGIES
from strategies.client_half import ClientHalf
from strategies.per_class import PerClassParams, PerClassStrategy, class_means, read_class_means

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig
    from fedkd.mitigations import ClientRound

CLASS_LOGITS = "class-logits"  # the reply kind and record, up and down


@dataclass
class FDParams(PerClassParams):
    beta: float = 1.0  # weight of the pull toward the federation's class logits

    def check(self, cfg: FedKDConfig) -> None:
        super().check(cfg)
        require(self.beta >= 0, "strategy.beta", self.beta, "a number >= 0")


@dataclass(frozen=True)
class ClassKD(LossTerm):
    """+ beta * tau^2 * KL(softmax(g_y / tau) || student) on each private example
    whose label's federation logits g_y are known."""

    logits: torch.Tensor  # (C, C) the federation's mean logits per class
    known: torch.Tensor  # (C,) bool
    beta: float

    def fold(self, step: Step, loss: torch.Tensor) -> torch.Tensor:
        mask = self.known.to(step.y.device)[step.y]
        if not bool(mask.any()):
            return loss
        target = tempered_softmax(self.logits.to(step.y.device)[step.y[mask]], step.temperature)
        pull = distillation_loss(step.logits[mask], target, step.temperature)
        return loss + self.beta * pull


class FDClient(ClientHalf):
    dp_sgd = False  # ClassKD is not in DP-SGD's loss

    def terms(self, ctx: ClientRound) -> list[LossTerm]:
        c = ctx.data.num_classes
        known = read_class_means(ctx.arrays, CLASS_LOGITS, c, c)
        return [] if known is None else [ClassKD(*known, self.params.beta)]

    def upload(self, ctx: ClientRound, proxy_x: torch.Tensor) -> ArrayRecord:
        z = predict_logits(ctx.student, ctx.x, device=ctx.device)
        return class_means(z, ctx.y, ctx.data.num_classes)


@STRATEGIES.register("fd")
class FD(PerClassStrategy):
    Params = FDParams
    reply_kind = CLASS_LOGITS
    reply_record = CLASS_LOGITS
    client_half = FDClient

    @property
    def width(self) -> int:
        return self.data.num_classes  # a logit per class

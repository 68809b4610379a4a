"""FedProto (Tan et al., AAAI 2022, "FedProto: Federated Prototype Learning across
Heterogeneous Clients"): knowledge as class prototypes, no proxy set, no server model.

A prototype is the mean representation of a class: the input of the student's last
linear layer. Client: after local training, its prototype of every class it holds
and how many examples each covers (C x d + C numbers). While training, each private
example's representation is pulled toward its label's global prototype:
    loss += lambda * MSE(f(x), P_y).
Server: P_c = the count-weighted mean of the clients' class-c prototypes, each
client's share capped (`max_weight_share`), values beyond `max_value` refused
(strategies/per_class.py, shared with FD).
Students may differ in architecture as long as their representations have the same
width (the paper's setting); fedkd reports each student's own classifier, where the
paper also scores the nearest global prototype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.nn import functional as F

from fedkd.config import require
from fedkd.loss_terms import LossTerm, Step
from fedkd.models import create_model
from fedkd.training import on_device
from strategies.base import STRATEGIES, ServerContext
from strategies.client_half import ClientHalf
from strategies.per_class import PerClassParams, PerClassStrategy, class_means, read_class_means

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig
    from fedkd.mitigations import ClientRound

PROTOTYPES = "prototypes"  # the reply kind and record, up and down


@dataclass
class FedProtoParams(PerClassParams):
    proto_weight: float = 1.0  # lambda: weight of the MSE pull toward the global prototypes
    max_value: float = 1e4

    def check(self, cfg: FedKDConfig) -> None:
        super().check(cfg)
        w = self.proto_weight
        require(w >= 0, "strategy.proto_weight", w, "a number >= 0")


def last_linear(model: nn.Module) -> nn.Linear:
    """The classifier: the model's last linear layer (its input is the representation)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no linear layer to take prototypes at")
    return layers[-1]


@contextmanager
def representations(model: nn.Module, into: list[torch.Tensor]) -> Iterator[None]:
    """While inside, every forward pass appends the representation it computed."""
    handle = last_linear(model).register_forward_pre_hook(lambda _, args: into.append(args[0]))
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class PrototypePull(LossTerm):
    """+ lambda * MSE(f(x), P_y) for private examples whose class has a prototype."""

    protos: torch.Tensor  # (C, d)
    known: torch.Tensor  # (C,) bool
    weight: float
    seen: list[torch.Tensor] = field(default_factory=list)  # filled by `during`

    def during(self, model: nn.Module) -> AbstractContextManager:
        self.seen.clear()
        return representations(model, self.seen)

    def fold(self, step: Step, loss: torch.Tensor) -> torch.Tensor:
        mask = self.known.to(step.y.device)[step.y]
        rep = self.seen[-1][: len(step.idx)]
        self.seen.clear()  # one forward pass per step: keep no graph alive
        if not bool(mask.any()):
            return loss
        target = self.protos.to(step.y.device)[step.y[mask]]
        return loss + self.weight * F.mse_loss(rep[mask], target)


class FedProtoClient(ClientHalf):
    dp_sgd = False  # PrototypePull is not in DP-SGD's loss

    def terms(self, ctx: ClientRound) -> list[LossTerm]:
        c, d = ctx.data.num_classes, last_linear(ctx.student).in_features
        known = read_class_means(ctx.arrays, PROTOTYPES, c, d)
        return [] if known is None else [PrototypePull(*known, self.params.proto_weight)]

    @torch.no_grad()
    def upload(self, ctx: ClientRound, proxy_x: torch.Tensor) -> ArrayRecord:
        model, seen = on_device(ctx.student, ctx.device).eval(), []
        with representations(model, seen):
            for i in range(0, len(ctx.x), 1000):
                model(ctx.x[i : i + 1000].to(ctx.device))
        return class_means(torch.cat(seen).float().cpu(), ctx.y, ctx.data.num_classes)


@STRATEGIES.register("fedproto")
class FedProto(PerClassStrategy):
    Params = FedProtoParams
    reply_kind = PROTOTYPES
    reply_record = PROTOTYPES
    client_half = FedProtoClient

    def setup(self, ctx: ServerContext) -> None:
        super().setup(ctx)
        m, data = self.cfg.model, self.data
        student = create_model(
            m.student_of(0),
            num_classes=data.num_classes,
            input_shape=data.input_shape,
            seed=(self.seed, "student-init"),
            **m.student_kwargs,
        )
        self._width = last_linear(student).in_features  # every student's: the paper's premise

    @property
    def width(self) -> int:
        return self._width

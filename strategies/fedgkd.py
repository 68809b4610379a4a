"""FedGKD (Yao et al., IEEE TPDS 2023, "FedGKD: Toward Heterogeneous Federated
Learning via Global Knowledge Distillation"): FedAvg whose clients also distill from
the federation's past, to keep local training from drifting away from it.

Server: FedAvg (strategies/fedavg.py, with its clipping and caps), plus a buffer of
the last `buffer_size` global models; their weight average is the teacher, sent
beside the global model (twice FedAvg's download). Client: starts from the global
model and adds, on each private batch,
    loss += gamma / 2 * tau^2 * KL(softmax(teacher(x) / tau) || softmax(z / tau)).
The teacher's weights come from an untrusted server: a client refuses names or
shapes that are not its own model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedkd.config import require
from fedkd.distill import distillation_loss, tempered_softmax
from fedkd.loss_terms import LossTerm, Step
from fedkd.models import create_model, with_activation
from fedkd.round import Round
from strategies.base import STRATEGIES
from strategies.fedavg import FedAvg, FedAvgParams, WeightsClient, cpu_state

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig
    from fedkd.mitigations import ClientRound
    from fedkd.protocol import ClientReply

GKD_TEACHER = "gkd-teacher"  # the averaged historical global models, down


@dataclass
class FedGKDParams(FedAvgParams):
    gamma: float = 0.2  # weight of the KD term (the paper's gamma; it uses gamma / 2)
    buffer_size: int = 5  # past global models averaged into the teacher (the paper's M)

    def check(self, cfg: FedKDConfig) -> None:
        super().check(cfg)
        require(self.gamma >= 0, "strategy.gamma", self.gamma, "a number >= 0")
        m = self.buffer_size
        require(1 <= m <= 100, "strategy.buffer_size", m, "a whole number from 1 to 100")


@dataclass(frozen=True)
class GlobalKD(LossTerm):
    """+ gamma / 2 * tau^2 * KL(teacher || student) on the private batch."""

    teacher: nn.Module
    gamma: float

    def fold(self, step: Step, loss: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = tempered_softmax(self.teacher(step.x), step.temperature)
        pull = distillation_loss(step.logits, target, step.temperature)
        return loss + self.gamma / 2 * pull


class FedGKDClient(WeightsClient):
    dp_sgd = False  # GlobalKD is not in DP-SGD's loss

    def terms(self, ctx: ClientRound) -> list[LossTerm]:
        if GKD_TEACHER not in ctx.arrays:
            return []
        teacher = self.model_like(ctx)
        state = dict(ctx.arrays[GKD_TEACHER].to_torch_state_dict())
        own = teacher.state_dict()
        if set(state) != set(own) or any(state[k].shape != v.shape for k, v in own.items()):
            raise ValueError(f"the server's {GKD_TEACHER!r} is not this client's model")
        if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
            raise ValueError(f"the server's {GKD_TEACHER!r} holds NaN or Inf")
        teacher.load_state_dict(state)
        return [GlobalKD(teacher.to(ctx.device).eval(), self.params.gamma)]

    def model_like(self, ctx: ClientRound) -> nn.Module:
        """A module of the client's own architecture (its weights are replaced)."""
        cfg, data = self.cfg, ctx.data
        model = create_model(
            cfg.model.student_of(ctx.partition_id),
            num_classes=data.num_classes,
            input_shape=data.input_shape,
            seed=(cfg.seed, "gkd-teacher"),
            **cfg.model.student_kwargs,
        )
        return with_activation(model, cfg.privacy.activation)


@STRATEGIES.register("fedgkd")
class FedGKD(FedAvg):
    Params = FedGKDParams
    client_half = FedGKDClient

    def __init__(self, cfg: FedKDConfig, params: FedGKDParams) -> None:
        super().__init__(cfg, params)
        self.history: list[dict[str, torch.Tensor]] = []  # the last global models, oldest first

    def broadcast(self, r: Round) -> dict[str, ArrayRecord]:
        out = super().broadcast(r)
        if self.history:
            out[GKD_TEACHER] = ArrayRecord(self.teacher_state())
        return out

    def teacher_state(self) -> dict[str, torch.Tensor]:
        """The buffer's weight average (integer buffers taken from the newest model)."""
        newest = self.history[-1]
        out = {}
        for key, ref in newest.items():
            if ref.is_floating_point():
                out[key] = torch.stack([s[key] for s in self.history]).mean(0).to(ref.dtype)
            else:
                out[key] = ref.clone()
        return out

    def aggregate(self, r: Round, replies: list[ClientReply]) -> tuple[ArrayRecord, dict[str, Any]]:
        record, stats = super().aggregate(r, replies)
        newest = {k: v.clone() for k, v in cpu_state(self.model).items()}  # not the live weights
        self.history = [*self.history, newest][-self.p.buffer_size :]
        return record, {**stats, "teacher_models": len(self.history)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.history = list(state.get("history", []))

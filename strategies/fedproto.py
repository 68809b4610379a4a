"""FedProto (Tan et al., AAAI 2022, "FedProto: Federated Prototype Learning across
Heterogeneous Clients"): knowledge as class prototypes, no proxy set, no server model.

A prototype is the mean representation of a class: the input of the student's last
linear layer. Client: after local training, its prototype of every class it holds
and how many examples each covers (C x d + C numbers). While training, each private
example's representation is pulled toward its label's global prototype:
    loss += lambda * MSE(f(x), P_y).
Server: P_c = the count-weighted mean of the clients' class-c prototypes, each
client's share capped (`max_weight_share`), values beyond `max_value` refused.
Students may differ in architecture as long as their representations have the same
width (the paper's setting); fedkd reports each student's own classifier, where the
paper also scores the nearest global prototype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn
from torch.nn import functional as F

from fedkd.comm.codecs import payload_bytes
from fedkd.comm.npy import array_from_numpy
from fedkd.config import require
from fedkd.loss_terms import LossTerm, Step
from fedkd.models import create_model
from fedkd.protocol import ClientReply, InvalidReply, check_array
from fedkd.round import Round
from fedkd.training import on_device
from strategies.base import STRATEGIES, ServerContext, Strategy, StrategyParams, capped_weights
from strategies.client_half import ClientHalf, checked_array

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig
    from fedkd.mitigations import ClientRound

PROTOTYPES = "prototypes"  # the reply kind and record, up and down


@dataclass
class FedProtoParams(StrategyParams):
    proto_weight: float = 1.0  # lambda: weight of the MSE pull toward the global prototypes
    max_weight_share: float = 0.5  # no client holds more of a class's prototype
    max_value: float = 1e4  # replies with a larger |value| are refused

    def check(self, cfg: FedKDConfig) -> None:
        w = self.proto_weight
        require(w >= 0, "strategy.proto_weight", w, "a number >= 0")
        share = self.max_weight_share
        require(0 < share <= 1, "strategy.max_weight_share", share, "a number in (0, 1]")
        require(self.max_value > 0, "strategy.max_value", self.max_value, "a number > 0")


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


def proto_record(protos: torch.Tensor, counts: torch.Tensor) -> ArrayRecord:
    arrays = {"protos": protos, "counts": counts}
    return ArrayRecord({k: array_from_numpy(v.float().numpy()) for k, v in arrays.items()})


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
        if PROTOTYPES not in ctx.arrays:  # round 1: no prototypes yet
            return []
        c, d = ctx.data.num_classes, last_linear(ctx.student).in_features
        protos = checked_array(ctx.arrays, PROTOTYPES, "protos", (c, d))
        known = checked_array(ctx.arrays, PROTOTYPES, "counts", (c,)) > 0
        return [PrototypePull(protos, known, self.params.proto_weight)]

    @torch.no_grad()
    def upload(self, ctx: ClientRound, proxy_x: torch.Tensor) -> ArrayRecord:
        model = on_device(ctx.student, ctx.device).eval()
        c, seen = ctx.data.num_classes, []
        with representations(model, seen):
            for i in range(0, len(ctx.x), 1000):
                model(ctx.x[i : i + 1000].to(ctx.device))
        rep = torch.cat(seen).float().cpu()
        counts = torch.bincount(ctx.y, minlength=c).float()
        sums = torch.zeros(c, rep.shape[1]).index_add_(0, ctx.y, rep)
        return proto_record(sums / counts.clamp_min(1).unsqueeze(1), counts)


@STRATEGIES.register("fedproto")
class FedProto(Strategy):
    Params = FedProtoParams
    reply_kind = PROTOTYPES
    reply_record = PROTOTYPES
    client_half = FedProtoClient
    uses_proxy = False
    has_server_model = False

    def __init__(self, cfg: FedKDConfig, params: FedProtoParams) -> None:
        super().__init__(cfg, params)
        self.p = params
        self.protos: torch.Tensor | None = None  # (C, d)
        self.known: torch.Tensor | None = None  # (C,) 1.0 where some client held the class

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
        self.width = last_linear(student).in_features  # every student's, the paper's premise

    def broadcast(self, r: Round) -> dict[str, ArrayRecord]:
        if self.protos is None:
            return {}
        return {PROTOTYPES: proto_record(self.protos, self.known)}

    def check_payload(self, r: Round, content: RecordDict) -> tuple[np.ndarray, np.ndarray]:
        record = content.array_records.get(PROTOTYPES)
        if record is None:
            raise InvalidReply(f"no ArrayRecord {PROTOTYPES!r}")
        c = self.data.num_classes
        protos = check_array(record, "protos", (c, self.width), np.dtype(np.float32))
        counts = check_array(record, "counts", (c,), np.dtype(np.float32))
        if (counts < 0).any() or (counts != np.round(counts)).any():
            raise InvalidReply("class counts must be whole numbers >= 0")
        if np.abs(protos).max(initial=0.0) > self.p.max_value:
            raise InvalidReply(f"a prototype value beyond +-{self.p.max_value:g}")
        return protos, counts

    def payload_bytes_bound(self, r: Round) -> int:
        c = self.data.num_classes
        return payload_bytes(proto_record(torch.zeros(c, self.width), torch.zeros(c)))

    def aggregate(self, r: Round, replies: list[ClientReply]) -> tuple[None, dict[str, Any]]:
        protos = torch.from_numpy(np.stack([rep.arrays[0] for rep in replies]))  # (K, C, d)
        counts = np.stack([rep.arrays[1] for rep in replies])  # (K, C)
        c = protos.shape[1]
        merged = torch.zeros(c, self.width) if self.protos is None else self.protos.clone()
        known = torch.zeros(c) if self.known is None else self.known.clone()
        for k in range(c):  # classes no client holds this round keep what was known
            if counts[:, k].sum() > 0:
                w = capped_weights(counts[:, k].tolist(), self.p.max_weight_share)
                merged[k] = torch.einsum("k,kd->d", torch.tensor(w) / sum(w), protos[:, k])
                known[k] = 1.0
        self.protos, self.known = merged, known
        return None, {"known_classes": int(known.sum())}

    def state_dict(self) -> dict[str, Any]:
        return {"protos": self.protos, "known": self.known}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.protos, self.known = state["protos"], state["known"]

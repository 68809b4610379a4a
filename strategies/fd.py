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
(`max_weight_share`) and logits beyond `max_logit` are refused, so one reply cannot
set a class's target. As in PFLlib's FD, a client's own logits are part of the mean
it is pulled toward (the paper's teacher leaves them out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from fedkd.comm.codecs import payload_bytes
from fedkd.comm.npy import array_from_numpy
from fedkd.config import require
from fedkd.distill import distillation_loss, tempered_softmax
from fedkd.loss_terms import LossTerm, Step
from fedkd.protocol import ClientReply, InvalidReply, check_array
from fedkd.round import Round
from fedkd.training import predict_logits
from strategies.base import STRATEGIES, Strategy, StrategyParams, capped_weights
from strategies.client_half import ClientHalf, checked_array

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig
    from fedkd.mitigations import ClientRound

CLASS_LOGITS = "class-logits"  # the reply kind and record, up and down


@dataclass
class FDParams(StrategyParams):
    beta: float = 1.0  # weight of the pull toward the federation's class logits
    max_weight_share: float = 0.5  # no client holds more of a class's mean
    max_logit: float = 1000.0  # replies with larger |logit| are refused

    def check(self, cfg: FedKDConfig) -> None:
        require(self.beta >= 0, "strategy.beta", self.beta, "a number >= 0")
        share = self.max_weight_share
        require(0 < share <= 1, "strategy.max_weight_share", share, "a number in (0, 1]")
        require(self.max_logit > 0, "strategy.max_logit", self.max_logit, "a number > 0")


def class_record(logits: torch.Tensor, counts: torch.Tensor) -> ArrayRecord:
    """Per-class logits (C, C) and the examples (or known flags) behind each row (C,)."""
    arrays = {"logits": logits, "counts": counts}
    return ArrayRecord({k: array_from_numpy(v.float().numpy()) for k, v in arrays.items()})


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
        if CLASS_LOGITS not in ctx.arrays:  # round 1: nothing known yet
            return []
        c = ctx.data.num_classes
        logits = checked_array(ctx.arrays, CLASS_LOGITS, "logits", (c, c))
        known = checked_array(ctx.arrays, CLASS_LOGITS, "counts", (c,)) > 0
        return [ClassKD(logits, known, self.params.beta)]

    def upload(self, ctx: ClientRound, proxy_x: torch.Tensor) -> ArrayRecord:
        c = ctx.data.num_classes
        z = predict_logits(ctx.student, ctx.x, device=ctx.device)
        counts = torch.bincount(ctx.y, minlength=c).float()
        sums = torch.zeros(c, c).index_add_(0, ctx.y, z)
        return class_record(sums / counts.clamp_min(1).unsqueeze(1), counts)


@STRATEGIES.register("fd")
class FD(Strategy):
    Params = FDParams
    reply_kind = CLASS_LOGITS
    reply_record = CLASS_LOGITS
    client_half = FDClient
    uses_proxy = False
    has_server_model = False

    def __init__(self, cfg: FedKDConfig, params: FDParams) -> None:
        super().__init__(cfg, params)
        self.p = params
        self.global_logits: torch.Tensor | None = None  # (C, C)
        self.known: torch.Tensor | None = None  # (C,) 1.0 where some client held the class

    def broadcast(self, r: Round) -> dict[str, ArrayRecord]:
        if self.global_logits is None:
            return {}
        return {CLASS_LOGITS: class_record(self.global_logits, self.known)}

    def check_payload(self, r: Round, content: RecordDict) -> tuple[np.ndarray, np.ndarray]:
        record = content.array_records.get(CLASS_LOGITS)
        if record is None:
            raise InvalidReply(f"no ArrayRecord {CLASS_LOGITS!r}")
        c = self.data.num_classes
        logits = check_array(record, "logits", (c, c), np.dtype(np.float32))
        counts = check_array(record, "counts", (c,), np.dtype(np.float32))
        if (counts < 0).any() or (counts != np.round(counts)).any():
            raise InvalidReply("class counts must be whole numbers >= 0")
        if np.abs(logits).max(initial=0.0) > self.p.max_logit:
            raise InvalidReply(f"a logit beyond +-{self.p.max_logit:g}")
        return logits, counts

    def payload_bytes_bound(self, r: Round) -> int:
        c = self.data.num_classes
        return payload_bytes(class_record(torch.zeros(c, c), torch.zeros(c)))

    def aggregate(self, r: Round, replies: list[ClientReply]) -> tuple[None, dict[str, Any]]:
        logits = torch.from_numpy(np.stack([rep.arrays[0] for rep in replies]))  # (K, C, C)
        counts = np.stack([rep.arrays[1] for rep in replies])  # (K, C)
        c = logits.shape[1]
        merged = torch.zeros(c, c) if self.global_logits is None else self.global_logits.clone()
        known = torch.zeros(c) if self.known is None else self.known.clone()
        for k in range(c):  # classes no client holds this round keep what was known
            if counts[:, k].sum() > 0:
                w = capped_weights(counts[:, k].tolist(), self.p.max_weight_share)
                merged[k] = torch.einsum("k,kc->c", torch.tensor(w) / sum(w), logits[:, k])
                known[k] = 1.0
        self.global_logits, self.known = merged, known
        return None, {"known_classes": int(known.sum())}

    def state_dict(self) -> dict[str, Any]:
        return {"global_logits": self.global_logits, "known": self.known}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_logits, self.known = state["global_logits"], state["known"]

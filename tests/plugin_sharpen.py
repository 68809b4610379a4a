"""An algorithm defined outside fedkd, both halves in one module, as a user would
write one: a client loss term of its own and a reply kind of its own.

Client: CE plus `weight` times the mean entropy of the student's predictions on its
private batch (entropy minimisation, Grandvalet & Bengio 2005), and as its reply the
histogram of the student's predicted classes on the round's proxy items, with how
many steps the term was folded into (so a test can see it ran where the client ran).
Server: the mean histogram; no server model. A run names this module in `plugins`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from fedkd.comm.codecs import payload_bytes
from fedkd.comm.npy import array_from_numpy
from fedkd.config import require
from fedkd.loss_terms import LossTerm, Step
from fedkd.protocol import InvalidReply, check_array
from fedkd.training import predict_logits
from strategies.base import STRATEGIES, Strategy, StrategyParams
from strategies.client_half import ClientHalf

HISTOGRAM = "class-histogram"


@dataclass
class SharpenParams(StrategyParams):
    weight: float = 0.1

    def check(self, cfg) -> None:
        require(self.weight >= 0, "strategy.weight", self.weight, "a number >= 0")


@dataclass(frozen=True)
class EntropyPenalty(LossTerm):
    weight: float
    folds: list[int] = field(default_factory=list)

    def fold(self, step: Step, loss: torch.Tensor) -> torch.Tensor:
        self.folds.append(1)
        p = torch.softmax(step.logits, dim=-1)
        return loss + self.weight * -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()


def histogram_record(hist: np.ndarray, folds: int) -> ArrayRecord:
    arrays = {"histogram": hist.astype(np.float32), "folds": np.array([folds], np.float32)}
    return ArrayRecord({k: array_from_numpy(v) for k, v in arrays.items()})


class SharpenClient(ClientHalf):
    dp_sgd = False

    def terms(self, ctx) -> list[LossTerm]:
        self.term = EntropyPenalty(self.params.weight)
        return [self.term]

    def upload(self, ctx, proxy_x: torch.Tensor) -> ArrayRecord:
        top = predict_logits(ctx.student, proxy_x, device=ctx.device).argmax(1)
        hist = np.bincount(top.numpy(), minlength=ctx.data.num_classes) / max(len(top), 1)
        return histogram_record(hist, len(self.term.folds))


@STRATEGIES.register("sharpen")
class Sharpen(Strategy):
    Params = SharpenParams
    reply_kind = HISTOGRAM
    reply_record = HISTOGRAM
    client_half = SharpenClient
    has_server_model = False

    def check_payload(self, r, content: RecordDict) -> tuple[np.ndarray, float]:
        record = content.array_records.get(HISTOGRAM)
        if record is None:
            raise InvalidReply(f"no ArrayRecord {HISTOGRAM!r}")
        hist = check_array(record, "histogram", (self.data.num_classes,), np.dtype(np.float32))
        folds = check_array(record, "folds", (1,), np.dtype(np.float32))
        if (hist < 0).any() or abs(float(hist.sum()) - 1) > 1e-3:
            raise InvalidReply("a histogram must be shares that sum to 1")
        return hist, float(folds[0])

    def payload_bytes_bound(self, r) -> int:
        return payload_bytes(histogram_record(np.zeros(self.data.num_classes), 0))

    def aggregate(self, r, replies) -> tuple[None, dict[str, Any]]:
        mean = np.mean([rep.arrays[0] for rep in replies], axis=0)
        return None, {
            "histogram_max": float(mean.max()),
            "term_folds": sum(rep.arrays[1] for rep in replies),
        }

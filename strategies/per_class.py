"""Knowledge kept as one vector per class, the shared half of FD (mean logits,
strategies/fd.py) and FedProto (prototypes, strategies/fedproto.py).

A client sends, for each class, the mean of some vector over its own examples of
that class and how many examples the mean covers (`class_means`); the server merges
each class across clients, count-weighted with every client's share capped
(`max_weight_share`: no count, however large, buys a class), and keeps what it knew
of a class no client held this round. Counts that are not whole numbers >= 0 and
values beyond `max_value` are refused; a client reads the broadcast back with the
same checks (`read_class_means`), since on a device the server is not trusted.
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
from fedkd.protocol import ClientReply, InvalidReply, check_array
from fedkd.round import Round
from strategies.base import Strategy, StrategyParams, capped_weights
from strategies.client_half import checked_array

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig

MEANS, COUNTS = "means", "counts"  # the arrays of a per-class record, up and down


@dataclass
class PerClassParams(StrategyParams):
    max_weight_share: float = 0.5  # no client holds more of a class's mean
    max_value: float = 1000.0  # replies with a larger |value| are refused

    def check(self, cfg: FedKDConfig) -> None:
        share = self.max_weight_share
        require(0 < share <= 1, "strategy.max_weight_share", share, "a number in (0, 1]")
        require(self.max_value > 0, "strategy.max_value", self.max_value, "a number > 0")


def class_record(means: torch.Tensor, counts: torch.Tensor) -> ArrayRecord:
    """Per-class means (C, D) and the examples (or known flags) behind each row (C,)."""
    arrays = {MEANS: means, COUNTS: counts}
    return ArrayRecord({k: array_from_numpy(v.float().numpy()) for k, v in arrays.items()})


def class_means(values: torch.Tensor, y: torch.Tensor, classes: int) -> ArrayRecord:
    """The record of a client's per-class means of `values` (N, D) over labels y."""
    counts = torch.bincount(y, minlength=classes).float()
    sums = torch.zeros(classes, values.shape[1]).index_add_(0, y, values)
    return class_record(sums / counts.clamp_min(1).unsqueeze(1), counts)


def read_class_means(
    arrays: dict[str, ArrayRecord], record: str, classes: int, width: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The server's per-class means (C, D) and which classes are known; None when the
    download has none yet (round 1). ValueError when they are malformed."""
    if record not in arrays:
        return None
    means = checked_array(arrays, record, MEANS, (classes, width))
    known = checked_array(arrays, record, COUNTS, (classes,)) > 0
    return means, known


class PerClassStrategy(Strategy):
    """The server half: no proxy set and no server model; `width` is D."""

    Params = PerClassParams
    uses_proxy = False
    has_server_model = False

    def __init__(self, cfg: FedKDConfig, params: PerClassParams) -> None:
        super().__init__(cfg, params)
        self.p = params
        self.means: torch.Tensor | None = None  # (C, D)
        self.known: torch.Tensor | None = None  # (C,) 1.0 where some client held the class

    @property
    def width(self) -> int:
        raise NotImplementedError

    def broadcast(self, r: Round) -> dict[str, ArrayRecord]:
        if self.means is None:
            return {}
        return {self.reply_record: class_record(self.means, self.known)}

    def check_payload(self, r: Round, content: RecordDict) -> tuple[np.ndarray, np.ndarray]:
        record = content.array_records.get(self.reply_record)
        if record is None:
            raise InvalidReply(f"no ArrayRecord {self.reply_record!r}")
        c = self.data.num_classes
        means = check_array(record, MEANS, (c, self.width), np.dtype(np.float32))
        counts = check_array(record, COUNTS, (c,), np.dtype(np.float32))
        if (counts < 0).any() or (counts != np.round(counts)).any():
            raise InvalidReply("class counts must be whole numbers >= 0")
        if np.abs(means).max(initial=0.0) > self.p.max_value:
            raise InvalidReply(f"a value beyond +-{self.p.max_value:g}")
        return means, counts

    def payload_bytes_bound(self, r: Round) -> int:
        c = self.data.num_classes
        return payload_bytes(class_record(torch.zeros(c, self.width), torch.zeros(c)))

    def aggregate(self, r: Round, replies: list[ClientReply]) -> tuple[None, dict[str, Any]]:
        means = torch.from_numpy(np.stack([rep.arrays[0] for rep in replies]))  # (K, C, D)
        counts = np.stack([rep.arrays[1] for rep in replies])  # (K, C)
        c = means.shape[1]
        merged = torch.zeros(c, self.width) if self.means is None else self.means.clone()
        known = torch.zeros(c) if self.known is None else self.known.clone()
        for k in range(c):  # classes no client holds this round keep what was known
            if counts[:, k].sum() > 0:
                w = capped_weights(counts[:, k].tolist(), self.p.max_weight_share)
                merged[k] = torch.einsum("k,kd->d", torch.tensor(w) / sum(w), means[:, k])
                known[k] = 1.0
        self.means, self.known = merged, known
        return None, {"known_classes": int(known.sum())}

    def state_dict(self) -> dict[str, Any]:
        return {"means": self.means, "known": self.known}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.means, self.known = state["means"], state["known"]

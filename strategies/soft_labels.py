"""Shared machinery of the soft-label strategies (FedMD, DS-FL, ...).

The server keeps a teacher. Each round it broadcasts the teacher's soft labels on the
round's proxy subset, collects the clients' logits on the same subset, turns them
into target probabilities with `aggregate_knowledge` (the one method a subclass
writes) and distills the teacher toward them. Round 1 sends no soft labels: an
untrained teacher has nothing to teach.

With `label_memory` the server remembers the latest target of every proxy item it
has received, and distills the teacher on all of them each round, not only on the
round's subset: a small subset per round (few bytes) still teaches the teacher the
whole proxy set over the rounds, at no extra cost on the wire.

The two directions can be coded apart: `codec` for the clients' uploads and
`download_codec` for the teacher's soft labels, which `download_size` limits to a
seeded sample of the round's items. Uploads carry the knowledge the teacher learns
from, and DS-FL's sharpened average needs little of it (an argmax per client loses
nothing measurable); downloads carry the teacher's soft labels, which the students
need as soft labels, but not on every item every round.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from fedkd.comm.codecs import CODECS, check, decode, encode, payload_bytes
from fedkd.config import one_of, require
from fedkd.distill import entropy, mean_logits
from fedkd.models import create_model
from fedkd.protocol import (
    KNOWLEDGE,
    LOGITS,
    REPLY_LOGITS,
    SOFT_LABELS,
    TEACHER,
    ClientReply,
    InvalidReply,
    ProxySegment,
    RoundPlan,
    download_rows,
)
from fedkd.round import Round
from fedkd.seeding import derive_seed
from fedkd.training import soft_labels
from strategies.base import ServerContext, Strategy, capped_weights
from strategies.robust import AggregationParams, robust_center

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig


BROADCASTS = ("teacher", "consensus")


@dataclass
class SoftLabelParams(AggregationParams):
    codec: str = "float16"  # of the clients' uploads (and downloads unless set apart)
    weighted: bool = False  # weight clients by num-examples when aggregating
    max_weight_share: float = 0.5  # weighted: no client gets more of the average
    label_memory: bool = False
    download_codec: str | None = None  # the teacher's soft labels; None: `codec`
    download_size: int | None = None  # a seeded sample of the round's items; None: all
    # what clients learn from: the teacher's soft labels on this round's items (fedkd),
    # or the previous round's consensus on that round's items (the DS-FL and FedMD
    # papers; BlazeFL's DS-FL)
    broadcast: str = "teacher"

    def check(self, cfg: FedKDConfig) -> None:
        super().check(cfg)
        for key in ("codec", "download_codec"):
            value = getattr(self, key)
            require(value is None or value in CODECS, f"strategy.{key}", value, one_of(CODECS))
        require(
            self.broadcast in BROADCASTS, "strategy.broadcast", self.broadcast, one_of(BROADCASTS)
        )
        per_round = cfg.proxy.per_round
        require(
            self.download_size is None or 1 <= self.download_size <= per_round,
            "strategy.download_size",
            self.download_size,
            f"a whole number from 1 to the proxy items per round ({per_round}), or null (all)",
        )
        share = self.max_weight_share
        require(0 < share <= 1, "strategy.max_weight_share", share, "a number in (0, 1]")
        require(
            not (self.robust and self.weighted),
            "strategy.weighted",
            self.weighted,
            f"false with aggregator={self.aggregator} (unweighted)",
        )
        lifelong = cfg.lifelong.name != "none"
        require(
            not (self.label_memory and lifelong),
            "strategy.label_memory",
            self.label_memory,
            "false with lifelong streams (use mitigation=teacher_memory)",
        )
        require(
            not (self.download_size is not None and lifelong),
            "strategy.download_size",
            self.download_size,
            "null with lifelong streams",
        )


class SoftLabelStrategy(Strategy):
    Params = SoftLabelParams
    reply_kind = REPLY_LOGITS

    def __init__(self, cfg: FedKDConfig, params: SoftLabelParams) -> None:
        super().__init__(cfg, params)
        self.p = params
        self.codec = params.codec
        self.download_codec = params.download_codec or params.codec
        self.temperature = cfg.distill.temperature
        self.teacher_ready = False

    def aggregate_knowledge(
        self, logits: torch.Tensor, weights: torch.Tensor | None
    ) -> torch.Tensor:
        """(K, n, C) client logits -> (n, C) target probabilities for the teacher."""
        raise NotImplementedError

    def center(self, values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Combine (K, n, C) per-client values into (n, C) with `strategy.aggregator`:
        the (weighted) mean, or a robust coordinate-wise median or trimmed mean."""
        if self.p.robust:
            return robust_center(values, self.p)
        return mean_logits(values, weights)

    def setup(self, ctx: ServerContext) -> None:
        super().setup(ctx)
        m = self.cfg.model
        self.teacher = create_model(
            m.teacher,
            num_classes=self.data.num_classes,
            input_shape=self.data.input_shape,
            seed=(self.seed, "teacher-init"),
            **m.teacher_kwargs,
        ).to(self.device)
        self.optimizer = self.server_optimizer(self.teacher)
        # label_memory: the latest target per proxy item; NaN rows: none received yet
        n, c = len(self.data.proxy_index), self.data.num_classes
        self.memory = torch.full((n, c), float("nan")) if self.p.label_memory else None
        # broadcast=consensus: the last round's targets and the proxy items they cover
        self.consensus: torch.Tensor | None = None
        self.consensus_items: list[list[int]] = []  # ProxySegment fields, plain

    @property
    def server_model(self) -> nn.Module:
        return self.teacher

    def download_plan(self, rnd: int) -> dict[str, Any]:
        """How the round's teacher labels travel: RoundPlan's teacher_* fields."""
        size = self.p.download_size
        count = -1 if size is None else size
        seed = derive_seed(self.seed, rnd, "download")
        return {"teacher_codec": self.download_codec, "teacher_count": count, "teacher_seed": seed}

    def plan(self, r: Round, pid: int) -> RoundPlan:
        items = tuple(ProxySegment(*seg) for seg in self.consensus_items)
        return replace(super().plan(r, pid), **self.download_plan(r.number), teacher_proxy=items)

    def broadcast(self, r: Round) -> dict[str, ArrayRecord]:
        if not self.teacher_ready:
            return {}
        sub = self.download_plan(r.number)
        n = len(r.proxy_x if self.consensus is None else self.consensus)
        rows = torch.from_numpy(download_rows(n, sub["teacher_count"], sub["teacher_seed"]))
        if self.consensus is not None:  # the last aggregate, on the items it was made on
            probs = self.consensus[rows]
        else:
            probs = soft_labels(self.teacher, r.proxy_x[rows], self.temperature, device=self.device)
        return {TEACHER: encode(probs, self.download_codec, SOFT_LABELS, kind="probs")}

    def check_payload(self, r: Round, content: RecordDict) -> ArrayRecord:
        record = content.array_records.get(KNOWLEDGE)
        if record is None:
            raise InvalidReply(f"no ArrayRecord {KNOWLEDGE!r}")
        check(record, self.codec, LOGITS, r.knowledge_shape)
        return record

    def payload_bytes_bound(self, r: Round) -> int:
        return payload_bytes(encode(torch.zeros(r.knowledge_shape), self.codec, LOGITS))

    def aggregate(self, r: Round, replies: list[ClientReply]) -> tuple[ArrayRecord, dict[str, Any]]:
        shape = r.knowledge_shape
        logits = torch.stack([decode(c.arrays, LOGITS, self.codec, shape) for c in replies])
        weights = None
        if self.p.weighted:  # capped: a declared size cannot buy the average
            sizes = capped_weights([c.num_examples for c in replies], self.p.max_weight_share)
            weights = torch.tensor(sizes, dtype=torch.float32)
        target = self.aggregate_knowledge(logits, weights)
        rows, _ = self.data.proxy_items(r.segments)
        # a diagnostic only the simulator can give: the proxy set's held-back labels
        hits = target.argmax(1).cpu().numpy() == self.data.proxy_y[rows]
        if self.memory is None:
            loss = self.distill_server_model(self.teacher, target, r, self.optimizer)
        else:
            self.memory[torch.from_numpy(rows)] = target.float().cpu()
            known = torch.nonzero(~self.memory[:, 0].isnan()).squeeze(1)
            x = self.data.proxy_x[known]
            loss = self.distill_server_model(
                self.teacher, self.memory[known], r, self.optimizer, x=x
            )
        self.teacher_ready = True
        if self.p.broadcast == "consensus":
            self.consensus = target.float().cpu()
            self.consensus_items = [[s.task, s.seed, s.count] for s in r.segments]
        stats = {
            "teacher_loss": loss,
            "target_entropy": float(entropy(target)),
            "target_accuracy": float(hits.mean()),
        }
        return encode(target, "float32", SOFT_LABELS, kind="probs"), stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "teacher_ready": self.teacher_ready,
            "memory": self.memory,
            "consensus": self.consensus,
            "consensus_items": self.consensus_items,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.teacher_ready = bool(state["teacher_ready"])
        self.memory = state.get("memory")
        self.consensus = state.get("consensus")
        self.consensus_items = state.get("consensus_items", [])

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

from dataclasses import replace
from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from fedkd.comm.codecs import CODECS, check, decode, encode
from fedkd.distill import coordinate_median, entropy, mean_logits, trimmed_mean
from fedkd.errors import ConfigError
from fedkd.models import create_model
from fedkd.privacy.upload import noisy_mean
from fedkd.protocol import (
    KNOWLEDGE,
    LOGITS,
    REPLY_LOGITS,
    SOFT_LABELS,
    TEACHER,
    ClientReply,
    InvalidReply,
    RoundPlan,
    download_rows,
)
from fedkd.seeding import derive_seed, torch_generator
from fedkd.training import soft_labels
from strategies.base import FederatedStrategy, ServerContext

AGGREGATORS = ("mean", "median", "trimmed_mean")


class SoftLabelStrategy(FederatedStrategy):
    reply_kind = REPLY_LOGITS

    def __init__(
        self,
        cfg: dict,
        codec: str = "float16",
        weighted: bool = False,
        aggregator: str = "mean",
        trim_fraction: float = 0.2,
        label_memory: bool = False,
        download_codec: str | None = None,
        download_size: int | None = None,
    ) -> None:
        super().__init__(cfg)
        for key, value in (("codec", codec), ("download_codec", download_codec or codec)):
            if value not in CODECS:
                raise ConfigError(f"strategy.{key}", value, "one of " + ", ".join(CODECS))
        per_round = cfg["proxy"]["subset_size"] or cfg["proxy"]["size"]
        if download_size is not None and (
            isinstance(download_size, bool)
            or not isinstance(download_size, int)
            or not 1 <= download_size <= per_round
        ):
            raise ConfigError(
                "strategy.download_size",
                download_size,
                f"a whole number from 1 to the proxy items per round ({per_round}), or null (all)",
            )
        if aggregator not in AGGREGATORS:
            raise ConfigError("strategy.aggregator", aggregator, "one of " + ", ".join(AGGREGATORS))
        if aggregator != "mean" and weighted:
            raise ConfigError(
                "strategy.weighted", weighted, f"false with aggregator={aggregator} (unweighted)"
            )
        if aggregator != "mean" and cfg["privacy"]["mode"] == "client":
            raise ConfigError(
                "strategy.aggregator",
                aggregator,
                "mean with privacy.mode=client (the noise is calibrated to a sum)",
            )
        if not 0 <= trim_fraction < 0.5:
            raise ConfigError("strategy.trim_fraction", trim_fraction, "a number in [0, 0.5)")
        if label_memory and cfg["lifelong"]["name"] != "none":
            raise ConfigError(
                "strategy.label_memory",
                label_memory,
                "false with lifelong streams (use lifelong.mitigation=teacher_memory)",
            )
        if download_size is not None and cfg["lifelong"]["name"] != "none":
            raise ConfigError("strategy.download_size", download_size, "null with lifelong streams")
        self.label_memory = bool(label_memory)
        self.codec = codec
        self.download_codec = download_codec or codec
        self.download_size = download_size
        self.weighted = weighted  # weight clients by num-examples when aggregating
        self.aggregator = aggregator
        self.trim_fraction = float(trim_fraction)
        self.temperature = float(cfg["distill"]["temperature"])
        self.teacher_ready = False

    def aggregate_knowledge(
        self, logits: torch.Tensor, weights: torch.Tensor | None
    ) -> torch.Tensor:
        """(K, n, C) client logits -> (n, C) target probabilities for the teacher."""
        raise NotImplementedError

    def center(self, values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Combine (K, n, C) per-client values into (n, C) with `strategy.aggregator`:
        the (weighted) mean, or a robust coordinate-wise median or trimmed mean."""
        if self.aggregator == "median":
            return coordinate_median(values)
        if self.aggregator == "trimmed_mean":
            return trimmed_mean(values, self.trim_fraction)
        return mean_logits(values, weights)

    def setup(self, ctx: ServerContext) -> None:
        super().setup(ctx)
        m = self.cfg["model"]
        self.teacher = create_model(
            m["teacher"],
            num_classes=self.data.num_classes,
            input_shape=self.data.input_shape,
            seed=(self.seed, "teacher-init"),
            **m["teacher_kwargs"],
        ).to(self.device)
        self.optimizer = torch.optim.Adam(
            self.teacher.parameters(), lr=float(self.cfg["distill"]["server_lr"])
        )
        # label_memory: the latest target per proxy item; NaN rows: none received yet
        n, c = len(self.data.proxy_index), self.data.num_classes
        self.memory = torch.full((n, c), float("nan")) if self.label_memory else None

    @property
    def server_model(self) -> nn.Module:
        return self.teacher

    def download_plan(self, rnd: int) -> dict[str, Any]:
        """How the round's teacher labels travel: RoundPlan's teacher_* fields."""
        count = -1 if self.download_size is None else int(self.download_size)
        seed = derive_seed(self.seed, rnd, "download")
        return {"teacher_codec": self.download_codec, "teacher_count": count, "teacher_seed": seed}

    def plan(self, rnd: int, pid: int) -> RoundPlan:
        return replace(super().plan(rnd, pid), **self.download_plan(rnd))

    def broadcast(self, rnd: int) -> dict[str, ArrayRecord]:
        if not self.teacher_ready:
            return {}
        sub = self.download_plan(rnd)
        rows = download_rows(len(self.round_proxy_x), sub["teacher_count"], sub["teacher_seed"])
        x = self.round_proxy_x[torch.from_numpy(rows)]
        probs = soft_labels(self.teacher, x, self.temperature, device=self.device)
        return {TEACHER: encode(probs, self.download_codec, SOFT_LABELS, kind="probs")}

    def check_payload(self, content: RecordDict) -> ArrayRecord:
        record = content.array_records.get(KNOWLEDGE)
        if record is None:
            raise InvalidReply(f"no ArrayRecord {KNOWLEDGE!r}")
        shape = (len(self.round_proxy_x), self.data.num_classes)
        check(record, self.codec, LOGITS, shape)
        return record

    def aggregate(self, rnd: int, replies: list[ClientReply]) -> tuple[ArrayRecord, dict[str, Any]]:
        shape = (len(self.round_proxy_x), self.data.num_classes)
        logits = torch.stack([decode(r.arrays, LOGITS, self.codec, shape) for r in replies])
        weights = None
        if self.weighted:
            weights = torch.tensor([r.num_examples for r in replies], dtype=torch.float32)
        pv = self.cfg["privacy"]
        if pv["mode"] == "client":  # the noisy mean of clipped logits, then post-processing
            gen = torch_generator(self.seed, rnd, "dp-noise")
            mean = noisy_mean(logits, pv["clip_norm"], pv["noise_multiplier"], gen)
            logits, weights = mean.unsqueeze(0), None
            self.dp_rounds += 1
        target = self.aggregate_knowledge(logits, weights)
        if self.memory is None:
            loss = self.distill_server_model(self.teacher, target, rnd, self.optimizer)
        else:
            rows, _ = self.data.proxy_items(self.ledger.segments)
            self.memory[torch.from_numpy(rows)] = target.float().cpu()
            known = torch.nonzero(~self.memory[:, 0].isnan()).squeeze(1)
            x = self.data.proxy_x[known]
            loss = self.distill_server_model(
                self.teacher, self.memory[known], rnd, self.optimizer, x=x
            )
        self.teacher_ready = True
        stats = {"teacher_loss": loss, "target_entropy": float(entropy(target))}
        return encode(target, "float32", SOFT_LABELS, kind="probs"), stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "teacher_ready": self.teacher_ready,
            "memory": self.memory,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.teacher_ready = bool(state["teacher_ready"])
        self.memory = state.get("memory")

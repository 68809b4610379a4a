"""A soft-label strategy defined outside fedkd, as a user would write one: the
consensus on each proxy item is the share of clients whose top class it is,
smoothed. Registered here; a run names this module in `plugins`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedkd.config import require
from strategies.base import STRATEGIES
from strategies.soft_labels import SoftLabelParams, SoftLabelStrategy


@dataclass
class VoteParams(SoftLabelParams):
    smoothing: float = 0.1  # mass spread evenly over all classes

    def check(self, cfg) -> None:
        super().check(cfg)
        require(0 <= self.smoothing < 1, "strategy.smoothing", self.smoothing, "in [0, 1)")


@STRATEGIES.register("vote")
class Vote(SoftLabelStrategy):
    Params = VoteParams

    def aggregate_knowledge(
        self, logits: torch.Tensor, weights: torch.Tensor | None
    ) -> torch.Tensor:
        c = logits.shape[-1]
        votes = torch.nn.functional.one_hot(logits.argmax(-1), c).float().mean(0)
        return (1 - self.p.smoothing) * votes + self.p.smoothing / c

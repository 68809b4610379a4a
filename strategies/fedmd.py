"""FedMD (Li & Wang 2019): the consensus is the mean of the clients' logits
(or, with `strategy.aggregator`, their coordinate-wise median or trimmed mean)."""

from __future__ import annotations

import torch

from fedkd.distill import tempered_softmax
from strategies.base import STRATEGIES
from strategies.soft_labels import SoftLabelStrategy


@STRATEGIES.register("fedmd")
class FedMD(SoftLabelStrategy):
    def aggregate_knowledge(
        self, logits: torch.Tensor, weights: torch.Tensor | None
    ) -> torch.Tensor:
        return tempered_softmax(self.center(logits, weights), self.temperature)

"""FedMD (Li & Wang 2019): the consensus is the mean of the clients' logits."""

from __future__ import annotations

import torch

from fedkd.distill import mean_logits, tempered_softmax
from strategies.soft_labels import SoftLabelStrategy


class FedMD(SoftLabelStrategy):
    def aggregate_knowledge(
        self, logits: torch.Tensor, weights: torch.Tensor | None
    ) -> torch.Tensor:
        return tempered_softmax(mean_logits(logits, weights), self.temperature)

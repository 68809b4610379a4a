"""DS-FL (Itahara et al., IEEE TMC 2021): entropy-reduction averaging (ERA).

Clients' outputs are turned into probabilities (softmax at T=1, as DS-FL clients
send), averaged, and sharpened: softmax(mean / era_temperature) with T < 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedkd.config import require
from fedkd.distill import entropy_reduction_average
from strategies.base import STRATEGIES
from strategies.soft_labels import SoftLabelParams, SoftLabelStrategy

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig


@dataclass
class DSFLParams(SoftLabelParams):
    era_temperature: float = 0.1  # T < 1 sharpens the averaged soft labels

    def check(self, cfg: FedKDConfig) -> None:
        super().check(cfg)
        t = self.era_temperature
        require(t > 0, "strategy.era_temperature", t, "a number > 0")


@STRATEGIES.register("dsfl")
class DSFL(SoftLabelStrategy):
    Params = DSFLParams

    def aggregate_knowledge(
        self, logits: torch.Tensor, weights: torch.Tensor | None
    ) -> torch.Tensor:
        return entropy_reduction_average(
            torch.softmax(logits, dim=-1), self.p.era_temperature, weights, center=self.center
        )

"""Aggregation that a hostile minority of clients cannot steer far, for soft-label
and weight strategies alike (`strategy.aggregator`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedkd.config import one_of, require
from fedkd.distill import coordinate_median, trimmed_mean
from strategies.base import StrategyParams

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig

AGGREGATORS = ("mean", "median", "trimmed_mean")


@dataclass
class AggregationParams(StrategyParams):
    aggregator: str = "mean"  # mean | median | trimmed_mean (robust to hostile clients)
    trim_fraction: float = 0.2  # trimmed_mean: share of clients cut at each end, per value

    def check(self, cfg: FedKDConfig) -> None:
        agg = self.aggregator
        require(agg in AGGREGATORS, "strategy.aggregator", agg, one_of(AGGREGATORS))
        require(
            agg == "mean" or cfg.privacy.mode != "client",
            "strategy.aggregator",
            agg,
            "mean with privacy.mode=client (the noise is calibrated to a sum)",
        )
        t = self.trim_fraction
        require(0 <= t < 0.5, "strategy.trim_fraction", t, "a number in [0, 0.5)")

    @property
    def robust(self) -> bool:
        return self.aggregator != "mean"


def robust_center(values: torch.Tensor, params: AggregationParams) -> torch.Tensor:
    """Per-coordinate median or trimmed mean over clients: (K, ...) -> (...)."""
    if params.aggregator == "median":
        return coordinate_median(values)
    return trimmed_mean(values, params.trim_fraction)

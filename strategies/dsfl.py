"""DS-FL (Itahara et al., IEEE TMC 2021): entropy-reduction averaging (ERA).

Clients' outputs are turned into probabilities (softmax at T=1, as DS-FL clients
send), averaged, and sharpened: softmax(mean / era_temperature) with T < 1.
"""

from __future__ import annotations

import torch

from fedkd.distill import entropy_reduction_average
from fedkd.errors import ConfigError
from strategies.soft_labels import SoftLabelStrategy


class DSFL(SoftLabelStrategy):
    def __init__(
        self,
        cfg: dict,
        era_temperature: float = 0.1,
        codec: str = "float16",
        weighted: bool = False,
        aggregator: str = "mean",
        trim_fraction: float = 0.2,
        label_memory: bool = False,
        download_codec: str | None = None,
        download_size: int | None = None,
    ) -> None:
        super().__init__(
            cfg,
            codec,
            weighted,
            aggregator,
            trim_fraction,
            label_memory,
            download_codec,
            download_size,
        )
        if era_temperature <= 0:
            raise ConfigError("strategy.era_temperature", era_temperature, "a number > 0")
        self.era_temperature = float(era_temperature)

    def aggregate_knowledge(
        self, logits: torch.Tensor, weights: torch.Tensor | None
    ) -> torch.Tensor:
        return entropy_reduction_average(
            torch.softmax(logits, dim=-1), self.era_temperature, weights, center=self.center
        )

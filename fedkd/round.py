"""The round in flight, as the strategy and the mitigation see it."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from fedkd.protocol import ProxySegment, RoundPlan

if TYPE_CHECKING:
    from fedkd.data.federated import FederatedData


@dataclass
class Round:
    """Round `number`: the sampled partitions, the proxy items it uses, what was sent."""

    number: int
    sampled: list[int]
    data: FederatedData
    segments: list[ProxySegment] = field(default_factory=list)
    plans: dict[int, RoundPlan] = field(default_factory=dict)
    bytes_down: int = 0

    @cached_property
    def proxy_x(self) -> torch.Tensor:
        """The round's proxy images (built once, after the segments are fixed)."""
        return self.data.proxy_inputs(self.segments)

    @property
    def knowledge_shape(self) -> tuple[int, int]:
        """Shape of one client's logits (or soft labels) on the round's proxy items."""
        return (len(self.proxy_x), self.data.num_classes)

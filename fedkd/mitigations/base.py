"""The mitigation interface: hooks on the server's round loop and on local training.

A mitigation fights forgetting across tasks. It is built on both sides from the same
config (`lifelong.mitigation`); the server calls the server hooks from the strategy's
round loop, the client calls `client_extras` before local training. The base class
is `none`: naive fine-tuning, the baseline every other one is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedkd.protocol import ProxySegment, RoundPlan

if TYPE_CHECKING:
    from fedkd.data.federated import FederatedData
    from strategies.base import FederatedStrategy


@dataclass
class ClientRound:
    """What a client-side hook sees: its data this round, its student, its state."""

    data: FederatedData
    partition_id: int
    plan: RoundPlan
    student: nn.Module
    state: dict[str, Any]  # persisted in the client store after the round
    new_task: bool  # the first round of a new task for this client
    previous_task: int | None
    x: torch.Tensor
    y: torch.Tensor
    device: str


@dataclass
class ClientExtras:
    """How a mitigation changes local training."""

    x: torch.Tensor
    y: torch.Tensor
    private_probs: torch.Tensor | None = None  # soft labels for x (LwF)
    private_weight: float = 0.0
    info: dict[str, float] = field(default_factory=dict)  # reported in the reply's metrics


class Mitigation:
    """No mitigation: naive fine-tuning across tasks."""

    name = "none"
    needs_server_model = False  # e.g. teacher_memory: local and central have none
    needs_clients = False  # client-side methods: central trains no clients
    needs_proxy = False  # the round needs a proxy subset even if the strategy uses none
    distills_server_model = False  # weight strategies run an extra server distillation

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.params = cfg.get("lifelong") or {}

    # ------------------------------------------------------------- server side
    def begin_round(self, strategy: FederatedStrategy, rnd: int) -> None:
        """Called once the round's clients and proxy subset are known."""

    def extra_segments(self, strategy: FederatedStrategy, rnd: int) -> list[ProxySegment]:
        """Proxy items added to the round's subset (e.g. remembered past-task items)."""
        return []

    def adjust_plan(
        self, strategy: FederatedStrategy, rnd: int, pid: int, plan: RoundPlan
    ) -> RoundPlan:
        return plan

    def client_payload(
        self,
        strategy: FederatedStrategy,
        rnd: int,
        pid: int,
        plan: RoundPlan,
        payload: dict[str, ArrayRecord],
    ) -> dict[str, ArrayRecord]:
        return payload

    def teacher_batch(
        self, strategy: FederatedStrategy, x: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The set the server model is distilled on: (inputs, targets, sample weights)."""
        return x, target, None

    def on_task_end(self, strategy: FederatedStrategy, task: int) -> None:
        """Called after the last round of each task in the schedule."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], strategy: FederatedStrategy) -> None:
        """Restore `state_dict()` on resume (the strategy is set up and restored)."""

    # ------------------------------------------------------------- client side
    def client_extras(self, ctx: ClientRound) -> ClientExtras:
        return ClientExtras(ctx.x, ctx.y)

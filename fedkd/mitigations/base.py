"""The mitigation interface: hooks on the server's round and on a client's training.

A mitigation fights forgetting across tasks. It is built on both sides from the
same config node (`mitigation`, conf/mitigation/NAME.yaml): the round loop calls the
server hooks, a client calls `client_extras` before local training and may let
`client_train` replace it. The server hooks see the run through a `MitigationContext`
(data, seed, device, the server model, the download codec), handed to `attach` once
the strategy is set up; never through the strategy itself. The base class is `none`:
naive fine-tuning, the baseline every other one is measured against.

A new mitigation is one file in fedkd/mitigations/ (a class registered with
`@MITIGATIONS.register("name")`, its settings a `Params` dataclass) plus
`conf/mitigation/name.yaml`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedkd.loss_terms import Rehearsal
from fedkd.protocol import ProxySegment, RoundPlan
from fedkd.registry import Registry
from fedkd.training import LocalTraining, distill_to_targets

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig
    from fedkd.data.federated import FederatedData
    from fedkd.round import Round

MITIGATIONS: Registry[type[Mitigation]] = Registry(
    "mitigation", "mitigation.name", ("fedkd.mitigations",)
)


@dataclass
class MitigationParams:
    """A mitigation's own settings (conf/mitigation/NAME.yaml); subclasses add fields."""

    name: str = "none"

    def check(self, cfg: FedKDConfig) -> None:
        """Reject values the mitigation cannot use (raise ConfigError)."""


@dataclass(frozen=True)
class MitigationContext:
    """What the server hooks may use of the run (built in fedkd/server_state.py)."""

    data: FederatedData
    seed: int  # the run's root seed
    device: str
    # the server model as it stands (trained in place round by round); None for a
    # strategy without one, which no mitigation that needs one is run with
    server_model: Callable[[], nn.Module | None]
    download_codec: str = "float16"  # of the teacher's soft labels down


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
    kd_x: torch.Tensor  # proxy items the teacher's soft labels are for
    teacher_probs: torch.Tensor | None
    generator: torch.Generator
    arrays: dict[str, ArrayRecord] = field(default_factory=dict)  # the download's records

    @property
    def training(self) -> LocalTraining:
        return self.plan.training

    def distill_on_proxy(
        self, epochs: int, lr: float, batch_size: int, momentum: float = 0.0
    ) -> float:
        """KD only: SGD on the student toward the teacher's labels on the proxy items
        (the sequential schedule's first phase, a reviewer's whole round)."""
        opt = torch.optim.SGD(self.student.parameters(), lr=lr, momentum=momentum)
        return distill_to_targets(
            self.student,
            self.kd_x,
            self.teacher_probs,
            temperature=self.training.temperature,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            generator=self.generator,
            device=self.device,
            optimizer=opt,
            shuffle=self.training.kd_shuffle,
        )


@dataclass
class ClientExtras:
    """How a mitigation changes local training."""

    x: torch.Tensor
    y: torch.Tensor
    private_probs: torch.Tensor | None = None  # soft labels for x (LwF)
    private_weight: float = 0.0
    rehearsal: Rehearsal | None = None  # public items to keep distilling on (student_memory)
    info: dict[str, float] = field(default_factory=dict)  # reported in the reply's metrics


@MITIGATIONS.register("none")
class Mitigation:
    """No mitigation: naive fine-tuning across tasks."""

    Params: ClassVar[type[MitigationParams]] = MitigationParams
    name: ClassVar[str] = "none"
    needs_server_model: ClassVar[bool] = False  # e.g. teacher_memory: local has none
    needs_clients: ClassVar[bool] = False  # client-side methods: central trains no clients
    needs_proxy: ClassVar[bool] = False  # the round needs proxy items the strategy may not
    distills_server_model: ClassVar[bool] = False  # weight strategies distill once more
    trains_on_private_data: ClassVar[bool] = False  # adds private-data losses (not DP-SGD)

    def __init__(self, cfg: FedKDConfig, params: MitigationParams) -> None:
        params.check(cfg)
        self.cfg = cfg
        self.params = params
        self.context: MitigationContext | None = None  # the server's, once attached

    def check_config(self, cfg: FedKDConfig) -> None:
        """Reject settings outside the mitigation's own that it cannot serve."""
        from fedkd.config import require

        if cfg.privacy.mode == "sample":
            require(
                not self.trains_on_private_data,
                "mitigation",
                self.name,
                "none, teacher_memory or review with privacy.mode=sample "
                f"({self.name} adds private-data losses outside DP-SGD)",
            )

    # ------------------------------------------------------------- server side
    def attach(self, context: MitigationContext) -> None:
        """What the server hooks see of the run, once the strategy is set up."""
        self.context = context

    def begin_round(self, r: Round) -> None:
        """Called once the round's clients and proxy subset are known."""

    def extra_segments(self, rnd: int) -> list[ProxySegment]:
        """Proxy items added to the round's subset (e.g. remembered past-task items)."""
        return []

    def adjust_plan(self, r: Round, pid: int, plan: RoundPlan) -> RoundPlan:
        return plan

    def client_payload(
        self, r: Round, pid: int, plan: RoundPlan, payload: dict[str, ArrayRecord]
    ) -> dict[str, ArrayRecord]:
        return payload

    def teacher_batch(
        self, x: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The set the server model is distilled on: (inputs, targets, sample weights)."""
        return x, target, None

    def on_task_end(self, task: int) -> None:
        """Called after the last round of each task in the schedule."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` on resume (attached; the server model restored)."""

    # ------------------------------------------------------------- client side
    def client_extras(self, ctx: ClientRound) -> ClientExtras:
        return ClientExtras(ctx.x, ctx.y)

    def client_train(self, ctx: ClientRound) -> float | None:
        """Replace the client's local training this round (return its loss), or None."""
        return None

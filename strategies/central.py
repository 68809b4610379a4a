"""Centralised training on the pooled private data: the upper bound.

No federation: the server trains the teacher architecture on the union of every
client's shard of the current task (with labels), `train.epochs` epochs per round,
and reports it as the teacher. Clients are not contacted, so client metrics are
null. In a lifelong stream this is sequential fine-tuning on pooled data, so no
mitigation applies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord
from torch import nn

from fedkd.errors import ConfigError
from fedkd.models import create_model
from fedkd.protocol import ClientReply
from fedkd.round import Round
from fedkd.seeding import torch_generator
from fedkd.training import train_student
from strategies.base import STRATEGIES, ServerContext, Strategy

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig
    from fedkd.mitigations import Mitigation


@STRATEGIES.register("central")
class Central(Strategy):
    uses_clients = False
    uses_proxy = False

    @classmethod
    def check_config(cls, cfg: FedKDConfig, mitigation: type[Mitigation]) -> None:
        super().check_config(cfg, mitigation)
        if mitigation.name != "none":
            raise ConfigError("mitigation", mitigation.name, "none: central trains no clients")

    def setup(self, ctx: ServerContext) -> None:
        super().setup(ctx)
        m = self.cfg.model
        self.model = create_model(
            m.teacher,
            num_classes=self.data.num_classes,
            input_shape=self.data.input_shape,
            seed=(self.seed, "teacher-init"),
            **m.teacher_kwargs,
        ).to(self.device)
        self._pooled: tuple[int, Any] | None = None

    @property
    def server_model(self) -> nn.Module:
        return self.model

    def aggregate(
        self, r: Round, replies: list[ClientReply]
    ) -> tuple[ArrayRecord | None, dict[str, Any]]:
        task = self.data.stream.global_task(r.number)
        if self._pooled is None or self._pooled[0] != task:
            self._pooled = (task, self.data.pooled_data(task))
        x, y = self._pooled[1]
        gen = torch_generator(self.seed, r.number, "central")
        loss = train_student(self.model, x, y, self.training, gen, device=self.device)
        return None, {"teacher_loss": loss}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])

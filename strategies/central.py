"""Centralised training on the pooled private data: the upper bound.

No federation: the server trains the teacher architecture on the union of every
client's shard of the current task (with labels), `train.epochs` epochs per round,
and reports it as the teacher. Clients are not contacted, so client metrics are
null. In a lifelong stream this is sequential fine-tuning on pooled data, so no
mitigation applies.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord
from omegaconf import DictConfig
from torch import nn

from fedkd.errors import ConfigError
from fedkd.models import create_model
from fedkd.protocol import ClientReply
from fedkd.seeding import torch_generator
from fedkd.training import LocalTraining, train_student
from strategies.base import FederatedStrategy, ServerContext


class Central(FederatedStrategy):
    uses_clients = False
    uses_proxy = False

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        super().check_config(cfg)
        if cfg.lifelong.mitigation != "none":
            raise ConfigError(
                "lifelong.mitigation", cfg.lifelong.mitigation, "none: central trains no clients"
            )

    def setup(self, ctx: ServerContext) -> None:
        super().setup(ctx)
        m = self.cfg["model"]
        self.model = create_model(
            m["teacher"],
            num_classes=self.data.num_classes,
            input_shape=self.data.input_shape,
            seed=(self.seed, "teacher-init"),
            **m["teacher_kwargs"],
        ).to(self.device)
        self._pooled: tuple[int, Any] | None = None

    @property
    def server_model(self) -> nn.Module:
        return self.model

    def aggregate(
        self, rnd: int, replies: list[ClientReply]
    ) -> tuple[ArrayRecord | None, dict[str, Any]]:
        task = self.stream.global_task(rnd)
        if self._pooled is None or self._pooled[0] != task:
            self._pooled = (task, self.data.pooled_data(task))
        x, y = self._pooled[1]
        tr = self.cfg["train"]
        hp = LocalTraining(
            epochs=int(tr["epochs"]),
            batch_size=int(tr["batch_size"]),
            lr=float(tr["lr"]),
            momentum=float(tr["momentum"]),
            weight_decay=float(tr["weight_decay"]),
        )
        gen = torch_generator(self.seed, rnd, "central")
        loss = train_student(self.model, x, y, hp, gen, device=self.device)
        return None, {"teacher_loss": loss}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])

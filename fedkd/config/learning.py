"""Config sections of learning: models, local training, distillation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedkd.config.checks import at_least as _at_least
from fedkd.config.checks import one_of, require


@dataclass
class ModelConfig:
    student: str = "cnn_small"
    students: list[str] = field(default_factory=list)  # client i gets students[i % len]
    teacher: str = "cnn"
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        from fedkd.models import list_models

        models = list_models()
        require(self.student in models, "model.student", self.student, one_of(models))
        require(self.teacher in models, "model.teacher", self.teacher, one_of(models))
        for i, name in enumerate(self.students):
            require(name in models, f"model.students[{i}]", name, one_of(models))

    def student_of(self, partition_id: int) -> str:
        """Heterogeneous students: client i gets students[i % len], else `student`."""
        return self.students[partition_id % len(self.students)] if self.students else self.student


@dataclass
class TrainConfig:
    """Local training on a client."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0

    def check(self) -> None:
        _at_least(self, "train", epochs=1, batch_size=1, weight_decay=0)
        require(self.lr > 0, "train.lr", self.lr, "a number > 0")
        require(0 <= self.momentum < 1, "train.momentum", self.momentum, "a number in [0, 1)")


SCHEDULES = ("joint", "sequential")
SERVER_OPTIMIZERS = ("adam", "sgd")


@dataclass
class DistillConfig:
    """Distillation on clients (toward the server's labels) and on the server (toward
    the aggregated client knowledge). docs/algorithms.md says which settings the
    papers and the reference code use."""

    temperature: float = 3.0
    alpha: float = 0.5  # joint: weight of CE on private data; (1 - alpha) goes to KD
    # joint: every local step is CE on private data + KD on the proxy (fedkd's default);
    # sequential: client_epochs of KD on the proxy, then train.epochs of CE (DS-FL, FedMD)
    client_schedule: str = "joint"
    client_epochs: int = 1  # sequential: KD epochs before local training
    client_lr: float = 0.1  # sequential: plain SGD
    client_batch_size: int = 50  # sequential
    server_epochs: int = 2  # teacher distillation epochs per round on the proxy subset
    server_lr: float = 0.001
    server_batch_size: int = 128
    server_optimizer: str = "adam"  # adam | sgd; kept across rounds (checkpointed)
    server_momentum: float = 0.0  # sgd
    # tau of the teacher's KD loss toward the aggregated targets (which are already
    # probabilities); null: `temperature`. The reference code uses 1.
    server_temperature: float | None = None
    # reshuffle the proxy items every KD epoch (the teacher's distillation and the
    # sequential schedule's client KD); false: the items' own order every epoch, as
    # the reference DS-FL's loaders take them
    shuffle: bool = True

    def check(self) -> None:
        require(self.temperature > 0, "distill.temperature", self.temperature, "a number > 0")
        require(0 <= self.alpha <= 1, "distill.alpha", self.alpha, "a number in [0, 1]")
        require(self.server_lr > 0, "distill.server_lr", self.server_lr, "a number > 0")
        require(self.client_lr > 0, "distill.client_lr", self.client_lr, "a number > 0")
        _at_least(
            self,
            "distill",
            server_epochs=0,
            server_batch_size=1,
            client_epochs=0,
            client_batch_size=1,
            server_momentum=0,
        )
        require(
            self.client_schedule in SCHEDULES,
            "distill.client_schedule",
            self.client_schedule,
            one_of(SCHEDULES),
        )
        require(
            self.server_optimizer in SERVER_OPTIMIZERS,
            "distill.server_optimizer",
            self.server_optimizer,
            one_of(SERVER_OPTIMIZERS),
        )
        require(self.server_momentum < 1, "distill.server_momentum", self.server_momentum, "< 1")
        t = self.server_temperature
        require(t is None or t > 0, "distill.server_temperature", t, "a number > 0, or null")

    @property
    def server_tau(self) -> float:
        return self.temperature if self.server_temperature is None else self.server_temperature

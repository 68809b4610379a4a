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


@dataclass
class DistillConfig:
    temperature: float = 3.0
    alpha: float = 0.5  # weight of CE on private data; (1 - alpha) goes to KD
    server_epochs: int = 2  # teacher distillation epochs per round on the proxy subset
    server_lr: float = 0.001
    server_batch_size: int = 128

    def check(self) -> None:
        require(self.temperature > 0, "distill.temperature", self.temperature, "a number > 0")
        require(0 <= self.alpha <= 1, "distill.alpha", self.alpha, "a number in [0, 1]")
        require(self.server_lr > 0, "distill.server_lr", self.server_lr, "a number > 0")
        _at_least(self, "distill", server_epochs=0, server_batch_size=1)

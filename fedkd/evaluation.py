"""What the server measures each round: its model on every task's test data, and the
accuracy matrices of the server model and of the students (fedkd/lifelong.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from fedkd.lifelong import LifelongTracker
from fedkd.protocol import ClientReply
from fedkd.training import accuracy

if TYPE_CHECKING:
    from fedkd.data.federated import FederatedData


class LifelongEvaluation:
    def __init__(self, data: FederatedData, device: str) -> None:
        self.data = data
        self.device = device
        self.teacher = LifelongTracker(data.num_tasks)
        self.students = LifelongTracker(data.num_tasks, "student_")
        self.student_baselines: list[list[float]] = []  # each student's b_j, as reported

    def evaluate(self, model: nn.Module | None) -> dict[str, Any]:
        """The server model on every task's test data (teacher_accuracy: their mean)."""
        if model is None:
            return {"teacher_accuracy": None, "task_accuracy": None}
        accs = [accuracy(model, x, y, device=self.device) for x, y in self.data.task_tests]
        return {"teacher_accuracy": float(np.mean(accs)), "task_accuracy": accs}

    def start(self, model: nn.Module | None) -> None:
        """Before round 1: the server model's accuracy before any training (b_j)."""
        if model is not None:
            self.teacher.baseline = self.evaluate(model)["task_accuracy"]

    def record_replies(self, replies: list[ClientReply]) -> None:
        for r in replies:
            if "initial-task-accuracy" in r.metrics:
                self.student_baselines.append(list(r.metrics["initial-task-accuracy"]))

    def round_metrics(
        self, rnd: int, model: nn.Module | None, student_row: list[float] | None, rounds: int
    ) -> dict[str, Any]:
        """The round's accuracy metrics for the server model and the students."""
        stream = self.data.stream
        evaluation = self.evaluate(model)
        task, end = stream.global_task(rnd), stream.is_task_end(rnd, rounds)
        if self.student_baselines:
            self.students.baseline = np.mean(np.array(self.student_baselines), axis=0).tolist()
        row = {k: v for k, v in evaluation.items() if k != "task_accuracy"}
        row.update(self.teacher.round(task, evaluation.get("task_accuracy"), end))
        row.update(self.students.round(task, student_row, end))
        return row

    def final(self) -> dict[str, Any]:
        return {**self.teacher.final(), **self.students.final()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "trackers": [t.state_dict() for t in (self.teacher, self.students)],
            "student_baselines": self.student_baselines,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for tracker, saved in zip((self.teacher, self.students), state["trackers"], strict=True):
            tracker.load_state_dict(saved)
        self.student_baselines = [list(b) for b in state["student_baselines"]]

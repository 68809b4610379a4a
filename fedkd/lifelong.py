"""Continual-learning metrics on the accuracy matrix R, and their per-round tracking.

R[k][j] is the test accuracy on task j after training through task k (0-based here
and in docs/algorithms.md; the papers write 1-based). b[j] is the accuracy on task j
before any training.
Functions take R as a list of rows (NaN where not measured) and return None when a
quantity is undefined (forgetting after the first task, BWT/FWT with one task).

- average accuracy     A_k = mean_{j<=k} R[k][j]
- forgetting (max)     F_k = mean_{j<k} (max_{l<k} R[l][j] - R[k][j])   (Chaudhry et al.)
- forgetting (last)    mean_{j<k} (R[j][j] - R[k][j])                  (Avalanche's variant)
- backward transfer    BWT = mean_{i<T-1} (R[T-1][i] - R[i][i])         (Lopez-Paz & Ranzato)
- forward transfer     FWT = mean_{i>=1} (R[i-1][i] - b[i])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Matrix = Sequence[Sequence[float]]


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def _nanmax(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return max(vals) if vals else math.nan


def avg_accuracy(R: Matrix, k: int) -> float | None:
    return _mean([R[k][j] for j in range(k + 1)])


def forgetting(R: Matrix, k: int) -> float | None:
    """Max-based forgetting after task k (Chaudhry et al. 2018); None for k == 0."""
    if k == 0:
        return None
    return _mean([_nanmax(R[i][j] for i in range(k)) - R[k][j] for j in range(k)])


def forgetting_last(R: Matrix, k: int) -> float | None:
    """Avalanche's forgetting: accuracy right after learning task j minus now."""
    if k == 0:
        return None
    return _mean([R[j][j] - R[k][j] for j in range(k)])


def bwt(R: Matrix) -> float | None:
    T = len(R)
    if T < 2:
        return None
    return _mean([R[T - 1][i] - R[i][i] for i in range(T - 1)])


def fwt(R: Matrix, b: Sequence[float]) -> float | None:
    T = len(R)
    if T < 2:
        return None
    return _mean([R[i - 1][i] - b[i] for i in range(1, T)])


def metrics_at(R: Matrix, k: int, b: Sequence[float] | None = None) -> dict[str, float | None]:
    """All metrics with rows 0..k of R known (R[k] may be the current round's row)."""
    known = [list(row) for row in R[: k + 1]]
    final = k == len(R) - 1
    return {
        "avg_accuracy": avg_accuracy(known, k),
        "forgetting": forgetting(known, k),
        "forgetting_last": forgetting_last(known, k),
        "bwt": bwt(known) if final else None,
        "fwt": fwt(known, b) if final and b is not None else None,
    }


class LifelongTracker:
    """Builds R from per-round rows; R[k] is the row of the last round of task k.

    `prefix` names the model: "" for the server model, "student_" for the students.
    """

    def __init__(self, num_tasks: int, prefix: str = "") -> None:
        self.T = num_tasks
        self.prefix = prefix
        self.R: list[list[float]] = [[math.nan] * num_tasks for _ in range(num_tasks)]
        self.baseline: list[float] | None = None

    def round(self, task: int, row: Sequence[float] | None, task_end: bool) -> dict[str, Any]:
        """Record the round's row (if any); return this round's metrics."""
        p = self.prefix
        if row is None:
            return {f"{p}task_accuracy": None}
        R = [list(r) for r in self.R]
        R[task] = list(row)
        if task_end:
            self.R[task] = list(row)
        out: dict[str, Any] = {f"{p}task_accuracy": list(row), f"{p}accuracy_matrix": _jsonable(R)}
        if self.T > 1:
            m = metrics_at(R, task, self.baseline)
            out.update({f"{p}{k}": v for k, v in m.items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"R": [list(r) for r in self.R], "baseline": self.baseline}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.R = [list(r) for r in state["R"]]
        self.baseline = None if state["baseline"] is None else list(state["baseline"])

    def final(self) -> dict[str, Any]:
        p = self.prefix
        out: dict[str, Any] = {f"{p}accuracy_matrix": _jsonable(self.R)}
        if self.T > 1:
            m = metrics_at(self.R, self.T - 1, self.baseline)
            out.update({f"{p}{k}": v for k, v in m.items()})
            out[f"{p}baseline_accuracy"] = self.baseline
        return out


def _jsonable(R: Matrix) -> list[list[float | None]]:
    return [[None if math.isnan(v) else float(v) for v in row] for row in R]

"""Experiment trackers: TensorBoard, MLflow and a CSV file, fed by the RunRecorder.

`logger=tensorboard`, `logger=mlflow`, `logger=csv` or several, `logger=[tensorboard,
mlflow]` (conf/logger/, `LoggerConfig`; docs/tracking.md). Each tracker gets the
resolved config as flat dotted parameters at the start, every round's numeric
metrics with the round as the step, and at the end the run's plots/*.png and
summary.json. Trackers only read: metrics.jsonl and summary.json are written first
and stay the source of truth; a tracker that fails is switched off for the rest of
the run and named in the log and in summary.json's `tracker_errors` (fanout.py).

A tracker is a class registered in `TRACKERS` with the Tracker methods, built with
the run's `RunInfo`; its library is imported when it starts, and `check_installed`
(called by fedkd.compose.validate, before any data is loaded) names the extra to
install when it is missing.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fedkd.config import LoggerConfig
from fedkd.errors import FedKDError
from fedkd.registry import Registry

INSTALL = "pip install 'fedkd[track]'"


@dataclass
class RunInfo:
    """What a tracker knows of the run it follows."""

    run_dir: Path
    name: str  # the run directory's name (a sweep's job: its subdir's last part)
    settings: LoggerConfig
    resume_round: int = 0  # fedkd-resume: the checkpoint's round (0: a new run)
    history: list[dict[str, Any]] = field(default_factory=list)  # rows 1..resume_round


class Tracker(Protocol):
    def __init__(self, run: RunInfo) -> None: ...

    @staticmethod
    def requires(settings: LoggerConfig) -> tuple[str, ...]:
        """The modules the tracker imports (checked before the run starts)."""
        ...

    def start(self, params: dict[str, Any]) -> None:
        """Open the run; `params`: the resolved config as flat dotted keys."""

    def log_round(self, step: int, metrics: dict[str, float]) -> None:
        """One round's numeric metrics (finite, no None), `step` its round."""

    def finish(self, run_dir: Path) -> None:
        """Store run_dir's plots/*.png and summary.json and close the run."""


TRACKERS: Registry[type[Tracker]] = Registry("tracker", "logger", modules=(__name__,))


class MissingExtra(FedKDError):
    """A configured tracker whose library is not installed."""


def _importable(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None  # None: an import that is made to fail
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_installed(settings: LoggerConfig) -> None:
    """Every enabled tracker's library is there, or one line naming the extra."""
    for name in settings.enabled():
        missing = [m for m in TRACKERS.get(name).requires(settings) if not _importable(m)]
        if missing:
            raise MissingExtra(
                f"logger={name} needs {', '.join(missing)}, which is not installed: {INSTALL}"
            )


__all__ = ["INSTALL", "TRACKERS", "MissingExtra", "RunInfo", "Tracker", "check_installed"]

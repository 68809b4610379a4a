"""The recorder's side of the trackers: build the configured ones, hand each the
run's parameters and rounds, and keep a failing tracker from touching the run.

A tracker that raises (a full disk, a locked database, a server gone) is logged
once as an error and switched off; the run goes on, and its files (metrics.jsonl,
summary.json, plots) are written as without trackers.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fedkd.config import LoggerConfig
from fedkd.results.trackers import TRACKERS, RunInfo, Tracker

log = logging.getLogger("fedkd.trackers")
SKIPPED_KEYS = ("node",)  # set on a device at run time, not a setting of the run


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool: what a tracker can plot."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def round_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A round's numeric fields (the round itself is the step): numbers as they are,
    a list of numbers (per-task accuracies) as `key/1`, `key/2`, ...; None, NaN,
    text and nested lists (the accuracy matrix: plots and summary.json) left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "round":
            continue
        if isinstance(value, list):
            out.update({f"{key}/{i}": v for i, v in enumerate(value, 1) if is_number(v)})
        elif is_number(value):
            out[key] = value
    return out


def config_params(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The resolved config as flat dotted keys (`strategy.name`, `train.lr`); lists
    and null as JSON text, other values as they are."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if not prefix and key in SKIPPED_KEYS:
            continue
        if isinstance(value, dict):
            out.update(config_params(value, f"{prefix}{key}."))
        elif isinstance(value, str | int | float | bool):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = json.dumps(value)
    return out


def logger_settings(config: dict[str, Any]) -> LoggerConfig:
    """The `logger` section of a plain config (its defaults where it has none)."""
    merged = OmegaConf.merge(OmegaConf.structured(LoggerConfig), config.get("logger") or {})
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


class TrackerSet:
    """The run's live trackers; `errors` names those that failed, and when."""

    def __init__(self, trackers: dict[str, Tracker]) -> None:
        self.live = dict(trackers)
        self.errors: dict[str, str] = {}

    def _each(self, when: str, call: Callable[[Tracker], None]) -> None:
        for name, tracker in list(self.live.items()):
            try:
                call(tracker)
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                self.errors[name] = f"failed {when}: {type(exc).__name__}: {first}"
                del self.live[name]
                log.error(
                    "fedkd: tracker %s %s; it is off for the rest of the run "
                    "(metrics.jsonl and summary.json are written as usual)",
                    name,
                    self.errors[name],
                )

    def start(self, params: dict[str, Any]) -> None:
        self._each("at the start", lambda t: t.start(params))

    def log_round(self, row: dict[str, Any]) -> None:
        step, metrics = int(row["round"]), round_metrics(row)
        self._each(f"in round {step}", lambda t: t.log_round(step, metrics))

    def finish(self, run_dir: Path) -> None:
        self._each("at the end", lambda t: t.finish(run_dir))
        self.live.clear()


def start_trackers(
    config: dict[str, Any],
    run_dir: Path,
    resume_round: int = 0,
    history: list[dict[str, Any]] | None = None,
) -> TrackerSet:
    """The trackers `config` enables, started (none: an empty set)."""
    settings = logger_settings(config)
    run = RunInfo(run_dir, run_dir.name, settings, resume_round)
    run.history = list(history or [])
    trackers = TrackerSet({name: TRACKERS.get(name)(run) for name in settings.enabled()})
    if trackers.live:
        trackers.start(config_params(config))
    return trackers

"""The one place results are written: one JSON line per round, a summary, plots.

Loggers fan out from here (file, progress display, plots, and the experiment
trackers the config's `logger` enables: fedkd/results/trackers/). `summary.json` is
written last and atomically, so a run directory with a summary is a finished run;
trackers read what was written and never change it (one that fails is reported in
the log and in summary.json's `tracker_errors`). No write follows a link planted in
the run directory (fedkd/atomic.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedkd.atomic import make_dir, open_append, write_text_atomic
from fedkd.errors import FedKDError
from fedkd.results.provenance import provenance

REQUIRED_FIELDS = (
    "round",
    "teacher_accuracy",
    "client_accuracy_mean",
    "client_accuracy_min",
    "client_accuracy_max",
    "bytes_up",
    "bytes_down",
    "clients",
    "rejected",
    "wall_seconds",
)
TIMING_FIELDS = (
    "wall_seconds",
    "elapsed_seconds",
    "clients_seconds",
    "server_seconds",
    "client_compute_seconds",
)
_TOTALS = (
    "bytes_up",
    "bytes_down",
    "clients",
    "replies",
    "rejected",
    "failed",
    "late",
    "skipped",
    "wall_seconds",
    "clients_seconds",
    "server_seconds",
    "client_compute_seconds",
)
_FINALS = (
    "teacher_accuracy",
    "client_accuracy_mean",
    "client_accuracy_min",
    "client_accuracy_max",
    "epsilon",
    "epsilon_unamplified",
    "max_participations",
    "delta",
    "noise_multiplier",
)


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/Inf to null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (a torn last line, from a kill, is dropped)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the process died while appending this row
            raise FedKDError(f"{path}: line {i + 1} is not JSON") from None
    return rows


class RunRecorder:
    def __init__(
        self,
        out_dir: str | Path,
        meta: dict[str, Any],
        progress: Any = None,
        plots: bool = True,
        resume_round: int = 0,
        config: dict[str, Any] | None = None,
    ):
        """A new metrics.jsonl, or, with `resume_round`, the existing one cut back to
        the rows of rounds 1..resume_round (what the checkpoint knows). `config`, the
        run's resolved config, starts the trackers its `logger` section enables."""
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.progress = progress
        self.plots = plots
        self.path = self.out_dir / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if resume_round:
            self.rows = [r for r in read_metrics(self.out_dir) if r["round"] <= resume_round]
            if [r["round"] for r in self.rows] != list(range(1, resume_round + 1)):
                raise FedKDError(
                    f"{self.path}: rounds 1..{resume_round} of the checkpoint are not all there"
                )
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows)
        write_text_atomic(self.path, text)
        self.elapsed = self.rows[-1]["elapsed_seconds"] if self.rows else 0.0
        from fedkd.results.trackers.fanout import TrackerSet, start_trackers

        self.trackers = (
            start_trackers(config, self.out_dir, resume_round, self.rows)
            if config
            else TrackerSet({})
        )

    def log_round(self, row: dict[str, Any]) -> None:
        full = {k: None for k in REQUIRED_FIELDS} | {k: _clean(v) for k, v in row.items()}
        self.elapsed += full.get("wall_seconds") or 0.0
        full["elapsed_seconds"] = self.elapsed
        self.rows.append(full)
        with open_append(self.path) as f:
            f.write(json.dumps(full, sort_keys=True) + "\n")
            f.flush()
        if self.progress is not None:
            self.progress.round(full)
        self.trackers.log_round(full)

    def summary(self) -> dict[str, Any]:
        last = self.rows[-1] if self.rows else {}
        teacher = [r["teacher_accuracy"] for r in self.rows if r["teacher_accuracy"] is not None]
        out: dict[str, Any] = dict(self.meta)
        out["rounds"] = len(self.rows)
        for key in _FINALS:
            if key in last:  # the privacy keys exist only in private runs
                out[key] = last[key]
        out["best_teacher_accuracy"] = max(teacher) if teacher else None
        for key in _TOTALS:
            out[key] = sum((r.get(key) or 0) for r in self.rows)
        out["bytes_up_per_round"] = out["bytes_up"] / max(1, len(self.rows))
        out["bytes_down_per_round"] = out["bytes_down"] / max(1, len(self.rows))
        if self.trackers.errors:
            out["tracker_errors"] = dict(self.trackers.errors)
        return out

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        summary = self.summary() | (extra or {}) | {"provenance": provenance()}
        if self.plots and self.rows:
            from fedkd.results import plots

            name = str(self.meta.get("strategy", ""))
            plots.plot_run(self.rows, make_dir(self.out_dir / "plots"), title=name)
            if (self.meta.get("num_tasks") or 1) > 1:
                for prefix, who in (("", "server model"), ("student_", "students (mean)")):
                    matrix = summary.get(f"{prefix}accuracy_matrix")
                    if matrix and any(v is not None for row in matrix for v in row):
                        plots.plot_accuracy_matrix(
                            matrix,
                            self.out_dir / "plots" / f"{prefix}accuracy_matrix.png",
                            f"{name}: R of the {who} (%)",
                        )
                    plots.plot_task_accuracy(
                        self.rows,
                        self.out_dir / "plots" / f"{prefix}task_accuracy.png",
                        f"{prefix}task_accuracy",
                        f"{name}: {who}, accuracy per task",
                    )
        write_json_atomic(self.out_dir / "summary.json", summary)
        if self.trackers.live:  # after the run's own files: trackers read them
            before = dict(self.trackers.errors)
            self.trackers.finish(self.out_dir)
            if self.trackers.errors != before:
                summary["tracker_errors"] = dict(self.trackers.errors)
                write_json_atomic(self.out_dir / "summary.json", summary)
        if self.progress is not None:
            self.progress.done(summary)
        return summary

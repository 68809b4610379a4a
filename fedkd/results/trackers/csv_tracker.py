"""`logger=csv`: <run dir>/metrics.csv, one row per round, a column per numeric metric
(lists per task as `key/1`, `key/2`, ...), empty where a round has no value."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from fedkd.atomic import write_text_atomic
from fedkd.config import LoggerConfig
from fedkd.results.trackers import TRACKERS, RunInfo
from fedkd.results.trackers.fanout import round_metrics


@TRACKERS.register("csv")
class CsvTracker:
    def __init__(self, run: RunInfo) -> None:
        self.path = run.run_dir / run.settings.csv.filename
        # resumed: the rows up to the checkpoint, as metrics.jsonl keeps them
        self.rows: list[dict[str, Any]] = [
            {"round": r["round"], **round_metrics(r)} for r in run.history
        ]

    @staticmethod
    def requires(settings: LoggerConfig) -> tuple[str, ...]:
        return ()

    def start(self, params: dict[str, Any]) -> None:
        self._write()

    def log_round(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append({"round": step, **metrics})
        self._write()

    def finish(self, run_dir: Path) -> None:
        pass

    def _write(self) -> None:
        """The whole file again (a later round may bring new columns), atomically."""
        columns: dict[str, None] = {"round": None}
        for row in self.rows:
            columns.update(dict.fromkeys(row))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.path, out.getvalue())

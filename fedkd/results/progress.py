"""Per-round progress on the driver's terminal (rich), one line per round."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:5.1f}%"


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e6:7.2f}"


class RoundProgress:
    def __init__(self, total_rounds: int, title: str, console: Console | None = None):
        self.total = total_rounds
        self.console = console or Console(stderr=True, highlight=False)
        self.console.print(f"[bold]{title}[/bold]")
        self.console.print(
            "round  teacher  students mean [min, max]     MB up   MB down  rejected  seconds"
        )

    def round(self, row: dict[str, Any]) -> None:
        band = (
            f"[{_pct(row['client_accuracy_min'])}, {_pct(row['client_accuracy_max'])}]"
            if row.get("client_accuracy_min") is not None
            else " " * 16
        )
        self.console.print(
            f"{row['round']:>3}/{self.total:<3} {_pct(row['teacher_accuracy'])}  "
            f"{_pct(row['client_accuracy_mean'])} {band}  {_mb(row['bytes_up'])}  "
            f"{_mb(row['bytes_down'])}  {row.get('rejected') or 0:>8}  {row['wall_seconds']:7.1f}"
        )

    def done(self, summary: dict[str, Any]) -> None:
        table = Table(title="summary", show_header=False)
        for key in (
            "strategy",
            "teacher_accuracy",
            "best_teacher_accuracy",
            "client_accuracy_mean",
            "bytes_up",
            "bytes_down",
            "rejected",
            "failed",
            "wall_seconds",
        ):
            value = summary.get(key)
            if isinstance(value, float):
                value = f"{value:.4f}"
            table.add_row(key, str(value))
        self.console.print(table)

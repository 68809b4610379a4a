"""Per-run figures: accuracy per round and bytes per round. Each PNG is written
atomically (fedkd/atomic.py), so a link planted in a run folder is replaced, never
written through."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedkd.atomic import write_atomic


def _save(fig: Figure, path: Path) -> None:
    """Write `fig` as a PNG at `path` and close it."""
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(rows: list[dict[str, Any]], out_dir: Path, title: str = "") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(6, 4))
    x, y = _series(rows, "teacher_accuracy")
    if x:
        ax.plot(x, y, marker="o", ms=3, label="teacher (server)")
    x, mean = _series(rows, "client_accuracy_mean")
    if x:
        _, lo = _series(rows, "client_accuracy_min")
        _, hi = _series(rows, "client_accuracy_max")
        ax.plot(x, mean, marker="s", ms=3, label="students (mean)")
        ax.fill_between(x, lo, hi, alpha=0.2, label="students (min-max)")
    ax.set(xlabel="round", ylabel="test accuracy", title=f"{title} accuracy per round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, out_dir / "accuracy.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [r["round"] for r in rows]
    width = 0.4
    ax.bar(
        [r - width / 2 for r in rounds],
        [(r["bytes_up"] or 0) / 1e6 for r in rows],
        width,
        label="up",
    )
    ax.bar(
        [r + width / 2 for r in rounds],
        [(r["bytes_down"] or 0) / 1e6 for r in rows],
        width,
        label="down",
    )
    ax.set(xlabel="round", ylabel="MB (all clients)", title=f"{title} bytes per round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    _save(fig, out_dir / "bytes.png")


def plot_accuracy_matrix(R: list[list[float | None]], path: Path, title: str = "") -> None:
    """Heatmap of R[k][j]: accuracy on task j (columns) after task k (rows)."""
    import numpy as np

    T = len(R)
    data = np.array([[np.nan if v is None else v for v in row] for row in R], dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * T + 2, 1.0 * T + 1.4))
    im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis")
    for k in range(T):
        for j in range(T):
            if not np.isnan(data[k, j]):
                ax.text(
                    j,
                    k,
                    f"{100 * data[k, j]:.0f}",
                    ha="center",
                    va="center",
                    color="white" if data[k, j] < 0.6 else "black",
                    fontsize=9,
                )
    ax.set_xticks(range(T), [f"task {j + 1}" for j in range(T)])
    ax.set_yticks(range(T), [f"after {k + 1}" for k in range(T)])
    ax.set(xlabel="evaluated on", ylabel="trained through", title=title or "accuracy matrix R (%)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, path)


def plot_task_accuracy(
    rows: list[dict[str, Any]], path: Path, key: str = "task_accuracy", title: str = ""
) -> None:
    """Accuracy on each task over rounds, with the task boundaries marked."""
    pts = [(r["round"], r[key]) for r in rows if r.get(key)]
    if not pts:
        return
    T = len(pts[0][1])
    fig, ax = plt.subplots(figsize=(7, 4))
    for j in range(T):
        ax.plot(
            [p[0] for p in pts], [p[1][j] for p in pts], marker="o", ms=2.5, label=f"task {j + 1}"
        )
    tasks = [r.get("task", 0) for r in rows]
    for i in range(1, len(rows)):
        if tasks[i] != tasks[i - 1]:
            ax.axvline(rows[i]["round"] - 0.5, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title=title or "accuracy per task")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    _save(fig, path)


def plot_method_bars(
    bars: dict[str, dict[str, tuple[float, float, int] | None]], path: Path
) -> None:
    """One panel per metric, one bar per method (mean ± std over seeds)."""
    titles = {
        "avg_accuracy": "final average accuracy (server)",
        "forgetting": "forgetting (server, max-based)",
        "student_forgetting": "forgetting (students, max-based)",
    }
    fig, axes = plt.subplots(1, len(bars), figsize=(4.2 * len(bars), 4), sharey=True)
    for ax, (key, per_method) in zip(axes, bars.items(), strict=True):
        names = list(per_method)
        means = [100 * (s[0] if s else 0) for s in per_method.values()]
        stds = [100 * (s[1] if s else 0) for s in per_method.values()]
        ax.barh(names, means, xerr=stds, color="tab:blue", alpha=0.8)
        ax.set(title=titles.get(key, key), xlabel="%", xlim=(0, 100))
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    _save(fig, path)

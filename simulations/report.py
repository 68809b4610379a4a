"""`fedkd-report DIR...`: turn finished runs into a Markdown and a CSV table.

Each argument is a run directory or any folder above run directories (a multirun).
A run is a directory with `summary.json` and `config.yaml`. Runs are grouped by
(strategy, mitigation); each cell is mean +- std over the group's seeds. Runs whose
settings differ in anything but strategy, mitigation and seed are refused rather
than tabulated together. Lifelong runs get the continual-learning columns and, with
`--out`, figures: the mean accuracy matrix of each group and forgetting per method.

`--vary KEY` allows one more setting to differ (e.g. `proxy.subset_size`); settings
that differ between runs, apart from the seed, name each row (`dsfl codec=int8`).
`--target-accuracy 0.8` adds the rounds and cumulative bytes (up + down) each run
needed before its server model first reached 80% test accuracy.

    fedkd-report multirun/2026-11-23/11-20-00 --out docs/results/default
    fedkd-report multirun/codecs --target-accuracy 0.8 --vary proxy.subset_size
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path

from simulations.cli import run_cli
from simulations.report_runs import ReportError, Run, check_same_setting, find_runs

PROG = "fedkd-report"

COLUMNS: list[tuple[str, str, str]] = [  # (summary key, header, format)
    ("teacher_accuracy", "teacher acc. (%)", "pct"),
    ("client_accuracy_mean", "student acc. mean (%)", "pct"),
    ("client_accuracy_min", "student acc. min (%)", "pct"),
    ("bytes_up_per_round", "up / round (MB)", "mb"),
    ("bytes_down_per_round", "down / round (MB)", "mb"),
    ("bytes_total", "total (MB)", "mb"),
    ("wall_seconds", "wall (s)", "s"),
]
LIFELONG_COLUMNS: list[tuple[str, str, str]] = [
    ("avg_accuracy", "avg acc. (%)", "pct"),
    ("forgetting", "forgetting (%)", "pct"),
    ("forgetting_last", "forgetting, last (%)", "pct"),
    ("bwt", "BWT (%)", "pct"),
    ("fwt", "FWT (%)", "pct"),
    ("student_avg_accuracy", "student avg acc. (%)", "pct"),
    ("student_forgetting", "student forgetting (%)", "pct"),
    ("bytes_total", "total (MB)", "mb"),
    ("wall_seconds", "wall (s)", "s"),
]


def reach_target(run: Run, target: float) -> None:
    """Rounds and cumulative bytes until the server model first reaches `target`."""
    path = run.path / "metrics.jsonl"
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: unreadable per-round metrics ({exc})") from None
    total = 0
    for row in rows:
        total += (row.get("bytes_up") or 0) + (row.get("bytes_down") or 0)
        acc = row.get("teacher_accuracy")
        if acc is not None and acc >= target:
            run.summary["rounds_to_target"] = float(row["round"])
            run.summary["bytes_to_target"] = float(total)
            return
    run.summary["rounds_to_target"] = run.summary["bytes_to_target"] = None


def _stats(values: list[float | None]) -> tuple[float, float, int] | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std, len(vals)


def _fmt(stat: tuple[float, float, int] | None, kind: str) -> str:
    if stat is None:
        return "-"
    mean, std, n = stat
    scale = {"pct": 100.0, "mb": 1e-6, "s": 1.0, "n": 1.0, "f2": 1.0}[kind]
    digits = {"pct": 1, "mb": 3, "s": 0, "n": 1, "f2": 2}[kind]
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if n > 1 else "")


def grouped(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.group].append(run)
    return dict(sorted(groups.items()))


def table(runs: list[Run], target: float | None = None) -> tuple[str, str]:
    """Markdown and CSV of the runs, one row per group, mean ± std over seeds."""
    columns = LIFELONG_COLUMNS if any(r.lifelong for r in runs) else COLUMNS
    label = "strategy + mitigation" if columns is LIFELONG_COLUMNS else "strategy"
    if any(r.summary.get("epsilon") is not None for r in runs):
        columns = [*columns[:1], ("epsilon", "epsilon", "f2"), *columns[1:]]
    if any(r.summary.get("epsilon_unamplified") is not None for r in runs):
        unamplified = ("epsilon_unamplified", "epsilon, worst client, unamplified", "f2")
        columns = [*columns[:2], unamplified, *columns[2:]]
    if target is not None:
        pct = f"{target * 100:g}%"
        columns = [
            *columns[:-1],
            ("rounds_to_target", f"rounds to {pct}", "n"),
            ("bytes_to_target", f"MB to {pct}", "mb"),
            columns[-1],
        ]
    header = [label, "seeds", *[h for _, h, _ in columns]]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        ["group", "seeds"] + [f"{k}_{s}" for k, _, _ in columns for s in ("mean", "std")]
    )
    for name, group in grouped(runs).items():
        seeds = sorted({r.summary.get("seed") for r in group})
        stats = [_stats([r.summary.get(k) for r in group]) for k, _, _ in columns]
        cells = [_fmt(s, kind) for s, (_, _, kind) in zip(stats, columns, strict=True)]
        md.append("| " + " | ".join([name, str(len(seeds)), *cells]) + " |")
        writer.writerow(
            [name, len(seeds)] + [x for s in stats for x in ((s[0], s[1]) if s else ("", ""))]
        )
    return "\n".join(md) + "\n", buf.getvalue()


def figures(runs: list[Run], out_dir: Path) -> list[Path]:
    """Mean accuracy matrices per group (server model and students), and forgetting /
    accuracy per method."""
    import warnings

    import numpy as np

    from fedkd.results.plots import plot_accuracy_matrix, plot_method_bars

    written = []
    groups = grouped([r for r in runs if r.lifelong])
    matrices = (  # summary key, file prefix, whose accuracy
        ("accuracy_matrix", "matrix", "the server model"),
        ("student_accuracy_matrix", "student_matrix", "the students (mean)"),
    )
    for name, group in groups.items():
        for key, prefix, whose in matrices:
            mats = [r.summary[key] for r in group if r.summary.get(key)]
            if not mats:
                continue
            arr = np.array(
                [[[np.nan if v is None else v for v in row] for row in m] for m in mats], float
            )
            with warnings.catch_warnings():  # cells of tasks not yet seen: all None
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(arr, axis=0).tolist()
            slug = name.replace(" + ", "_").replace(" ", "_").replace("=", "-")
            path = out_dir / f"{prefix}_{slug}.png"
            plot_accuracy_matrix(mean, path, f"{name}: R of {whose} (%), {len(mats)} seed(s)")
            written.append(path)
    if groups:
        bars = {
            key: {n: _stats([r.summary.get(key) for r in g]) for n, g in groups.items()}
            for key in ("avg_accuracy", "forgetting", "student_forgetting")
        }
        path = out_dir / "forgetting.png"
        plot_method_bars(bars, path)
        written.append(path)
    return written


def produced_by(runs: list) -> str:
    """A line naming the commits and CPUs the runs came from (summary.json's
    provenance; runs from before it was recorded count as unknown)."""
    seen = [r.summary.get("provenance") or {} for r in runs]
    commits = sorted({p.get("commit") or "unknown" for p in seen})
    cpus = sorted({p.get("cpu") or "unknown" for p in seen})
    return f"\nProduced by commit {', '.join(commits)} on {'; '.join(cpus)}.\n"


def report(
    paths: list[str],
    out: str | None,
    vary: tuple[str, ...] = (),
    target: float | None = None,
) -> str:
    runs = find_runs(paths)
    check_same_setting(runs, vary)
    if target is not None:
        if not 0.0 < target <= 1.0:
            raise ReportError(f"--target-accuracy must lie in (0, 1], got {target}")
        for run in runs:
            reach_target(run, target)
    markdown, csv_text = table(runs, target)
    markdown += produced_by(runs)
    if out:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "table.md").write_text(markdown)
        (out_dir / "table.csv").write_text(csv_text)
        figures(runs, out_dir)
    return markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="run directories or folders containing them")
    parser.add_argument("--out", help="also write table.md and table.csv here")
    parser.add_argument(
        "--vary", action="append", default=[], metavar="KEY", help="a setting runs may differ in"
    )
    parser.add_argument(
        "--target-accuracy", type=float, metavar="X", help="rounds and bytes to reach X (0-1)"
    )
    args = parser.parse_args(argv)

    def go() -> None:
        print(report(args.dirs, args.out, tuple(args.vary), args.target_accuracy), end="")

    run_cli(PROG, go)


if __name__ == "__main__":
    main()

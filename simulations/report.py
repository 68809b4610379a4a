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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedkd.errors import FedKDError
from simulations.cli import run_cli

PROG = "fedkd-report"

# Keys that may differ between runs of one table: what is being compared, and
# where each run happened to write its files.
VARYING = ("strategy", "seed", "mitigation", "simulation.client_state_dir", "output")
# Of those, what never names a row: the seed, and what follows from the strategy name.
NOT_LABELS = (
    "seed",
    "simulation.client_state_dir",
    "strategy.name",
    "strategy._target_",
    "mitigation.name",  # already in the row's name
    "output",  # plots, progress display, checkpoints: never a result
)

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


class ReportError(FedKDError):
    pass


@dataclass
class Run:
    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    label_keys: tuple[str, ...] = ()  # compared settings that name the row

    @property
    def group(self) -> str:
        mitigation = self.summary.get("mitigation") or "none"
        name = str(self.summary.get("strategy"))
        name = f"{name} + {mitigation}" if self.lifelong else name
        flat = _flatten(self.config)
        extras = [f"{k.split('.')[-1]}={flat[k]}" for k in self.label_keys if k in flat]
        return " ".join([name, *extras])

    @property
    def lifelong(self) -> bool:
        return (self.summary.get("num_tasks") or 1) > 1


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def find_runs(paths: list[str]) -> list[Run]:
    runs = []
    for p in paths:
        root = Path(p)
        if not root.exists():
            raise ReportError(f"{p}: no such directory")
        for summary in sorted(root.rglob("summary.json")):
            run_dir = summary.parent
            config = run_dir / "config.yaml"
            if not config.exists():
                continue
            try:
                s = json.loads(summary.read_text())
                c = yaml.safe_load(config.read_text())
            except (json.JSONDecodeError, yaml.YAMLError) as exc:
                raise ReportError(f"{run_dir}: unreadable results ({exc})") from None
            s["bytes_total"] = (s.get("bytes_up") or 0) + (s.get("bytes_down") or 0)
            runs.append(Run(run_dir, s, upgrade_config(c)))
    if not runs:
        raise ReportError(
            "no finished runs (directories with summary.json and config.yaml) under "
            + ", ".join(paths)
        )
    fill_new_settings(runs)
    return runs


# Before mitigations had their own config group, their name and every mitigation's
# parameters sat in `lifelong`.
LEGACY_MITIGATION_KEYS = (
    "mitigation",
    "memory_weight",
    "memory_size",
    "lwf_weight",
    "review_fraction",
    "replay_size",
)


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """An older run's config.yaml in today's layout (`mitigation` group, no
    `strategy._target_`), so it groups with runs made today."""
    from dataclasses import fields

    from fedkd.errors import ConfigError
    from fedkd.mitigations import mitigation_class

    lifelong = config.get("lifelong") or {}
    if "mitigation" not in config and "mitigation" in lifelong:
        name = lifelong["mitigation"]
        node = {"name": name}
        try:
            params = [f.name for f in fields(mitigation_class(name).Params)]
        except ConfigError:  # a mitigation that no longer exists
            params = []
        node.update({k: lifelong[k] for k in params if k in lifelong and k != "name"})
        config["mitigation"] = node
        for key in LEGACY_MITIGATION_KEYS:
            lifelong.pop(key, None)
    (config.get("strategy") or {}).pop("_target_", None)
    return config


def fill_new_settings(runs: list[Run]) -> None:
    """A setting added to fedkd after a run was made is missing from its config.yaml:
    give it today's default for the run's strategy and mitigation (new settings
    default to the old behaviour), so old and new runs of one setting compare as one."""
    from fedkd.compose import compose_config

    defaults: dict[tuple[str, str], dict[str, Any]] = {}
    for run in runs:
        key = (
            str(run.config.get("strategy", {}).get("name")),
            str(run.config.get("mitigation", {}).get("name", "none")),
        )
        if key not in defaults:
            try:
                defaults[key] = compose_config([f"strategy={key[0]}", f"mitigation={key[1]}"])
            except FedKDError:  # a strategy that no longer exists: leave the run as it is
                defaults[key] = {}
        _fill_missing(run.config, defaults[key])


def _fill_missing(config: dict[str, Any], default: dict[str, Any]) -> None:
    for key, value in default.items():
        if key not in config:
            config[key] = value
        elif isinstance(value, dict) and isinstance(config[key], dict):
            _fill_missing(config[key], value)


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == x or key.startswith(x + ".") for x in prefixes)


def check_same_setting(runs: list[Run], vary: tuple[str, ...] = ()) -> None:
    """Every run must share every setting except those in VARYING and `vary`; the
    compared settings that do differ (but the seed) become part of each row's name."""
    allowed = VARYING + vary

    def setting(run: Run) -> dict[str, Any]:
        return {k: v for k, v in _flatten(run.config).items() if not _matches(k, allowed)}

    ref = setting(runs[0])
    for run in runs[1:]:
        other = setting(run)
        for key in sorted(set(ref) | set(other)):
            if ref.get(key) != other.get(key):
                raise ReportError(
                    f"runs of different settings are mixed: {key} is {ref.get(key)!r} in "
                    f"{runs[0].path} but {other.get(key)!r} in {run.path} "
                    f"(compare it on purpose with --vary {key})"
                )
    # A compared setting names the rows if two runs of one strategy and mitigation
    # differ in it (others have other settings; their names tell them apart).
    flats = [
        (f"{r.summary.get('strategy')}+{r.summary.get('mitigation')}", _flatten(r.config))
        for r in runs
    ]
    keys = sorted({k for _, f in flats for k in f if _matches(k, allowed)})

    def differs(key: str) -> bool:
        seen: dict[str, set[str]] = defaultdict(set)
        for name, f in flats:
            seen[name].add(json.dumps(f.get(key)))
        return any(len(v) > 1 for v in seen.values())

    labels = tuple(k for k in keys if not _matches(k, NOT_LABELS) and differs(k))
    for run in runs:
        run.label_keys = labels


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
    """Mean accuracy matrix per group, and forgetting / accuracy per method."""
    import numpy as np

    from fedkd.results.plots import plot_accuracy_matrix, plot_method_bars

    written = []
    groups = grouped([r for r in runs if r.lifelong])
    for name, group in groups.items():
        mats = [r.summary.get("accuracy_matrix") for r in group if r.summary.get("accuracy_matrix")]
        if not mats:
            continue
        arr = np.array(
            [[[np.nan if v is None else v for v in row] for row in m] for m in mats], float
        )
        mean = np.nanmean(arr, axis=0).tolist()
        path = out_dir / f"matrix_{name.replace(' + ', '_')}.png"
        plot_accuracy_matrix(mean, path, f"{name}: R of the server model (%), {len(mats)} seed(s)")
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

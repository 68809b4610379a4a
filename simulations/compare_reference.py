"""The "DS-FL against the reference" table (docs/strategies.md): server-model accuracy per round,
mean +- std over seeds, for BlazeFL runs (JSON from simulations/blazefl_reference.py)
beside fedkd runs (run directories of `fedkd-sim experiment=blazefl_dsfl`).

    python -m simulations.compare_reference --reference ref_seed*.json --fedkd RUN_DIRS...
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fedkd.errors import FedKDError
from fedkd.results.recorder import read_metrics


def reference_curve(path: Path) -> dict[int, float]:
    return {r["round"]: r["server_acc"] for r in json.loads(path.read_text())["rounds"]}


def fedkd_curve(run: Path) -> dict[int, float]:
    return {r["round"]: r["teacher_accuracy"] for r in read_metrics(run)}


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.1f}"
    return f"{statistics.mean(pct):.1f} ± {statistics.stdev(pct):.1f}"


def table(reference: list[dict[int, float]], fedkd: list[dict[int, float]], every: int) -> str:
    last = max(max(c) for c in reference + fedkd)
    lines = [
        f"| round | BlazeFL DS-FL ({len(reference)} seeds) | fedkd dsfl ({len(fedkd)} seeds) "
        "| fedkd - BlazeFL (points) |",
        "|---|---|---|---|",
    ]
    for rnd in sorted({1, *range(every, last + 1, every)}):
        ref = [c[rnd] for c in reference if rnd in c]
        ours = [c[rnd] for c in fedkd if rnd in c]
        gap = "-"
        if ref and ours:
            gap = f"{100 * (statistics.mean(ours) - statistics.mean(ref)):+.1f}"
        lines.append(f"| {rnd} | {cell(ref)} | {cell(ours)} | {gap} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, nargs="+", required=True)
    ap.add_argument("--fedkd", type=Path, nargs="+", required=True)
    ap.add_argument("--every", type=int, default=5)
    args = ap.parse_args()
    try:
        reference = [reference_curve(p) for p in args.reference]
        fedkd = [fedkd_curve(p) for p in args.fedkd]
    except (OSError, ValueError, KeyError, TypeError, FedKDError) as exc:  # exits 2, no traceback
        ap.error(f"cannot read the runs: {type(exc).__name__}: {exc}")
    print(table(reference, fedkd, args.every))


if __name__ == "__main__":
    main()

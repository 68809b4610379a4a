"""`fedkd-bench`'s tables: the one it prints after a workload, and docs/benchmarks.md,
which `fedkd-bench summarize` writes from a folder of result JSONs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from simulations.bench_workloads import CLIENT_WORKLOADS, PROG

# the timed table's columns: (result key, header, format)
ROWS = [
    ("clients_per_round", "clients/round", "{:d}"),
    ("num_clients", "registered", "{:d}"),
    ("execution", "execution", "{}"),
    ("sim_round_seconds", "sim round (s)", "{:.2f}"),
    ("bound_round_seconds", "bound round (s)", "{:.2f}"),
    ("overhead_ratio", "overhead ratio", "{:.3f}"),
    ("bound2_round_seconds", "2-process bound (s)", "{:.2f}"),
    ("overhead_ratio_2proc", "vs 2-process bound", "{:.3f}"),
    ("parallel_efficiency", "slot busy", "{:.0%}"),
    ("startup_seconds", "start-up (s)", "{:.1f}"),
    ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"),
    ("bytes_up_per_client_round", "up/client/round (B)", "{:.0f}"),
    ("bytes_down_per_client_round", "down/client/round (B)", "{:.0f}"),
]


def _cell(result: dict[str, Any], key: str, fmt: str) -> str:
    value = result.get(key)
    return "-" if value is None else fmt.format(value)


def markdown(results: list[dict[str, Any]]) -> str:
    """The simulator-against-bound table (ROWS), one row per workload."""
    header = ["workload", *[h for _, h, _ in ROWS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        lines.append("| " + " | ".join([r["name"], *[_cell(r, k, f) for k, _, f in ROWS]]) + " |")
    return "\n".join(lines) + "\n"


def bytes_markdown(results: list[dict[str, Any]]) -> str:
    """Bytes per client per round (up + down), each against FedAvg's with the same student."""
    fedavg = {r.get("student"): r for r in results if r.get("strategy") == "fedavg"}
    lines = [
        "| workload | strategy | student (parameters) | payload | proxy items/round "
        "| up + down per client per round (B) | vs FedAvg, same student |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        total = r["bytes_up_per_client_round"] + r["bytes_down_per_client_round"]
        ref = fedavg.get(r.get("student"))
        if r.get("strategy") == "fedavg":
            ratio, items = "1", "-"
        else:
            ref_total = (
                ref and ref["bytes_up_per_client_round"] + ref["bytes_down_per_client_round"]
            )
            ratio = f"1/{ref_total / total:.1f}" if ref_total else "-"
            items = str(r.get("proxy_per_round", "-"))
        student = f"{r.get('student', '?')} ({r.get('student_parameters', 0):,})"
        lines.append(
            f"| {r['name']} | {r.get('strategy', '?')} | {student} | {r.get('codec', '?')} "
            f"| {items} | {total:,.0f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def clients_markdown(results: list[dict[str, Any]]) -> str:
    """Each many-clients workload against the 10-client round of the same invocation."""
    base = {
        r.get("invocation"): r["sim_round_seconds"]
        for r in results
        if r["name"] == "clients-fedavg-n10"
    }
    lines = [
        "| workload | clients/round | registered | execution | sim round (s) "
        "| vs 10-client round | 2-process bound (s) | vs 2-process bound "
        "| training floor (s) | floor vs 10-client round | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ten = base.get(r.get("invocation"))
        fedavg = bool(ten) and "fedavg" in r["name"]
        vs_ten = f"{r['sim_round_seconds'] / ten:.2f}" if fedavg else "-"
        floor = r.get("floor2_round_seconds")
        floor_vs_ten = f"{floor / ten:.2f}" if fedavg and floor else "-"
        lines.append(
            f"| {r['name']} | {r['clients_per_round']} | {r['num_clients']} "
            f"| {r.get('execution', '-')} | {r['sim_round_seconds']:.2f} | {vs_ten} "
            f"| {_cell(r, 'bound2_round_seconds', '{:.2f}')} "
            f"| {_cell(r, 'overhead_ratio_2proc', '{:.3f}')} "
            f"| {_cell(r, 'floor2_round_seconds', '{:.2f}')} | {floor_vs_ten} "
            f"| {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def print_table(results: list[dict[str, Any]]) -> None:
    """The same table as `markdown`, on the terminal after a run."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fedkd-bench")
    table.add_column("workload")
    for _, header, _ in ROWS:
        table.add_column(header, justify="right")
    for r in results:
        table.add_row(r["name"], *[_cell(r, k, f) for k, _, f in ROWS])
    Console(width=170).print(table)


def load_results(folder: str) -> list[dict[str, Any]]:
    """The result JSONs in `folder`, ordered by clients per round, then registered
    clients, then name (the table's order)."""
    from fedkd.errors import FedKDError

    files = sorted(Path(folder).glob("*.json"))
    if not files:
        raise FedKDError(f"{folder}: no benchmark results (*.json)")
    results = [json.loads(f.read_text()) for f in files]
    results.sort(key=lambda r: (r["clients_per_round"], r["num_clients"], r["name"]))
    return results


def _preamble(folder: str, results: list[dict[str, Any]]) -> list[str]:
    """The page's title and how to read it: where it came from, on what machine and
    when (the span of the results' dates), and what its columns mean."""
    m = results[0]["machine"]
    dates = sorted(r["machine"]["date"] for r in results)
    return [
        "# fedkd benchmarks",
        "",
        f"Written by `{PROG} summarize {folder}` from one JSON per workload (`make bench`).",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs; Python {m['python']}, torch {m['torch']},",
        f"flwr {m['flwr']}, ray {m['ray']}; measured {dates[0]} to {dates[-1]} (each"
        " workload's JSON has its date; rows without an `execution` predate cohorts and"
        " ran a node per client). Times are steady-state rounds"
        " (round 1 excluded); `overhead ratio` = simulator round / compute-bound round;"
        " `slot busy` = summed client compute / (client slots x client phase of the round).",
        "",
    ]


def summarize(folder: str, out: str | None) -> str:
    """docs/benchmarks.md from a folder of result JSONs: the table, the machine, the
    command of every workload."""
    results = load_results(folder)
    payload = [r for r in results if r["name"].startswith("bytes-")]
    order = [name for name, _ in CLIENT_WORKLOADS]
    many = sorted(
        (r for r in results if r["name"].startswith("clients-")),
        key=lambda r: order.index(r["name"]) if r["name"] in order else len(order),
    )
    timed = [r for r in results if not r["name"].startswith(("bytes-", "clients-"))]
    lines = [
        *_preamble(folder, results),
        "## Simulator against the compute bound",
        "",
        "Workloads named `bytes-*` are in the next table; `-` marks a workload run"
        " without the bound (`--no-bound`).",
        "",
        markdown(timed),
        "## Many clients: the same images in 10 to 1,000 clients",
        "",
        "`fedkd-bench clients --out-dir docs/bench` (one invocation: every ratio below"
        " compares rounds measured minutes apart on the same machine). FedAvg, 48,000"
        " private IID images per round cut into N clients; `vs 10-client round` is the"
        " simulator's round over the 10-client round of the same invocation;"
        " `2-process bound` runs the same clients without Flower or Ray on 2 processes"
        " of one torch thread; `training floor` times only their local SGD on 2 such"
        " processes (no client state, evaluation, encoding, messages or server).",
        "",
        clients_markdown(many) if many else "(no many-clients workloads)\n",
        "## Bytes on the wire",
        "",
        "Measured from the ArrayRecords of steady-state rounds (soft labels travel both"
        " ways; FedAvg's weights too).",
        "",
        bytes_markdown(payload) if payload else "(no payload workloads)\n",
        "## Workloads",
        "",
        "`fedkd-bench --name NAME OVERRIDES`:",
        "",
        *[f"- `{r['name']}`: `{' '.join(r['overrides'])}`" for r in results],
        "",
    ]
    text = "\n".join(lines)
    if out:
        Path(out).write_text(text)
    return text

"""`fedkd-bench`: the simulator against the compute bound, on one workload.

    fedkd-bench --name dsfl-100 --out docs/bench/dsfl-100.json OVERRIDES...
    fedkd-bench summarize docs/bench --out docs/benchmarks.md

The workload is the Hydra config composed from OVERRIDES (as for fedkd-sim). It runs
twice:

(a) through the simulator: `fedkd-sim` in a child process (Flower's simulation
    engine on Ray), its process tree's peak RSS sampled every 0.2 s;
(b) the compute bound: exactly the same work — the same sampled clients, plans,
    payloads, client function (`fedkd.local_round.client_reply`), validation, aggregation
    and evaluation, with the same seeds — run sequentially in this one process with
    torch using every core: no simulation engine, no Ray, no message transport;
(c) the same again on 2 worker processes of one torch thread each (the round's
    clients in groups, as cohorts are): the tighter bound on a 2-core machine, where
    many small clients gain little from torch's threads;
(d) for `fedkd-bench clients`' FedAvg workloads, the training floor: only the local
    SGD of the same clients on 2 processes, nothing else timed.

`overhead_ratio` = (a) / (b), `overhead_ratio_2proc` = (a) / (c), over steady-state
rounds (round 1 warms caches and actors and is excluded; process start-up is
reported as `startup_seconds`).

    fedkd-bench clients --out-dir docs/bench

runs the many-clients workloads (`CLIENT_WORKLOADS`: the same 48,000 private images
per round cut into 10 to 1,000 FedAvg clients, 10,000 registered with 1,000 per
round, and the dsfl bench workload at 1,000 per round) in one invocation, so their
ratios to the 10-client round come from one machine state.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from simulations.bench_measure import (
    machine,
    parallel_efficiency,
    run_bound,
    run_simulator,
    run_training_floor,
    student_parameters,
)
from simulations.cli import run_cli

PROG = "fedkd-bench"


BOUND_PROCESSES = 2

# The many-clients workloads (issue: a round's cost should follow its images, not its
# clients): FedAvg on 48,000 private IID images per round, next to no evaluation.
FEDAVG_IMAGES = [
    "strategy=fedavg",
    "partition=iid",
    "proxy.size=12000",
    "train.lr=0.05",
    "eval.client_test_size=1",
    "eval.teacher_test_size=1000",
    "rounds=3",
]
CLIENT_WORKLOADS = [
    ("clients-fedavg-n10", [*FEDAVG_IMAGES, "num_clients=10", "clients_per_round=10"]),
    ("clients-fedavg-n100", [*FEDAVG_IMAGES, "num_clients=100", "clients_per_round=100"]),
    ("clients-fedavg-n1000", [*FEDAVG_IMAGES, "num_clients=1000", "clients_per_round=1000"]),
    (
        "clients-fedavg-n10000-cpr1000",
        [*FEDAVG_IMAGES, "num_clients=10000", "clients_per_round=1000"],
    ),
    (
        "clients-dsfl-n1000",
        ["experiment=bench", "num_clients=1000", "clients_per_round=1000", "rounds=2"],
    ),
]


def bench(
    name: str, overrides: list[str], out: str | None, bound: bool, floor: bool = False
) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir

    from fedkd.config import CONF_DIR, validate

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    validate(cfg)  # bad workloads fail here, in one line
    with tempfile.TemporaryDirectory(prefix="fedkd-bench-") as tmp:
        run_dir = Path(tmp) / "sim"
        result: dict[str, Any] = {
            "name": name,
            "overrides": overrides,
            "num_clients": int(cfg.num_clients),
            "clients_per_round": int(cfg.clients_per_round),
            "rounds": int(cfg.rounds),
            "sim_torch_threads_per_client": int(cfg.simulation.num_cpus),
            "strategy": str(cfg.strategy.name),
            "student": str(cfg.model.student),
            "student_parameters": student_parameters(cfg),
            "codec": payload_name(cfg.strategy),
            "proxy_per_round": int(cfg.proxy.subset_size or cfg.proxy.size),
            "execution": resolved_execution(cfg),
        }
        result |= run_simulator(overrides, run_dir)
        if bound:
            config = run_dir / "config.yaml"
            result |= run_bound(config, Path(tmp) / "bound")
            result |= run_bound(config, Path(tmp) / "bound2", processes=BOUND_PROCESSES)
            sim = result["sim_round_seconds"]
            result["overhead_ratio"] = sim / result["bound_round_seconds"]
            result["overhead_ratio_2proc"] = sim / result[f"bound{BOUND_PROCESSES}_round_seconds"]
        if floor:
            result |= run_training_floor(config, Path(tmp) / "floor", BOUND_PROCESSES)
        result["parallel_efficiency"] = parallel_efficiency(result)
    result["machine"] = machine()
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print_table([result])
    return result


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


def resolved_execution(cfg: Any) -> str:
    """The execution path fedkd-sim takes for this workload (fedkd/cohort.py)."""
    from fedkd.cohort import resolve_execution
    from fedkd.compose import to_plain

    plain = to_plain(cfg)
    mode = resolve_execution(plain)
    return f"{mode} ({plain['simulation']['cohort_nodes']} nodes)" if mode == "cohort" else mode


def clients(out_dir: str, only: list[str] | None = None) -> list[dict[str, Any]]:
    """The many-clients workloads (those named in `only`, else all), one
    invocation; prints their ratios."""
    import time

    from fedkd.errors import FedKDError

    names = [name for name, _ in CLIENT_WORKLOADS]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise FedKDError(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(names)}")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    results = []
    for name, overrides in CLIENT_WORKLOADS:
        if only and name not in only:
            continue
        result = bench(name, overrides, None, bound=True, floor="strategy=fedavg" in overrides)
        result["invocation"] = stamp
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        results.append(result)
    print(clients_markdown(results), end="")
    return results


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


def payload_name(strategy: Any) -> str:
    """What travels: a codec, or one per direction when they differ."""
    up = strategy.get("codec")
    if up is None:
        return "float32 weights"
    down, size = strategy.get("download_codec") or up, strategy.get("download_size")
    if down == up and size is None:
        return str(up)
    return f"{up} up / {down} down" + (f" on {size} items" if size is not None else "")


def print_table(results: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fedkd-bench")
    table.add_column("workload")
    for _, header, _ in ROWS:
        table.add_column(header, justify="right")
    for r in results:
        table.add_row(r["name"], *[_cell(r, k, f) for k, _, f in ROWS])
    Console(width=170).print(table)


def summarize(folder: str, out: str | None) -> str:
    """docs/benchmarks.md from a folder of result JSONs: the table, the machine, the
    command of every workload."""
    from fedkd.errors import FedKDError

    files = sorted(Path(folder).glob("*.json"))
    if not files:
        raise FedKDError(f"{folder}: no benchmark results (*.json)")
    results = [json.loads(f.read_text()) for f in files]
    results.sort(key=lambda r: (r["clients_per_round"], r["num_clients"], r["name"]))
    payload = [r for r in results if r["name"].startswith("bytes-")]
    order = [name for name, _ in CLIENT_WORKLOADS]
    many = sorted(
        (r for r in results if r["name"].startswith("clients-")),
        key=lambda r: order.index(r["name"]) if r["name"] in order else len(order),
    )
    timed = [r for r in results if not r["name"].startswith(("bytes-", "clients-"))]
    m = results[0]["machine"]
    dates = sorted(r["machine"]["date"] for r in results)
    lines = [
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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["clients"]:
        p = argparse.ArgumentParser(prog=f"{PROG} clients")
        p.add_argument("--out-dir", default="docs/bench")
        p.add_argument("--only", nargs="*", help="run these workloads only (names)")
        args = p.parse_args(argv[1:])
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
        run_cli(PROG, lambda: clients(args.out_dir, args.only))
        return
    if argv[:1] == ["summarize"]:
        p = argparse.ArgumentParser(prog=f"{PROG} summarize")
        p.add_argument("folder")
        p.add_argument("--out")
        args = p.parse_args(argv[1:])
        run_cli(PROG, lambda: print(summarize(args.folder, args.out), end=""))
        return
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--name", default="workload")
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument("--no-bound", action="store_true", help="only run the simulator")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedkd-sim")
    args = p.parse_args(argv)
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    run_cli(PROG, lambda: bench(args.name, args.overrides, args.out, not args.no_bound))


if __name__ == "__main__":
    main()

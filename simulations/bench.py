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
    parallel_efficiency,
    run_bound,
    run_simulator,
    run_training_floor,
)
from simulations.bench_probes import machine, student_parameters
from simulations.bench_summary import clients_markdown, print_table, summarize
from simulations.bench_workloads import CLIENT_WORKLOADS, PROG
from simulations.cli import run_cli

BOUND_PROCESSES = 2


def bench(
    name: str, overrides: list[str], out: str | None, bound: bool, floor: bool = False
) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir

    from fedkd.compose import validate
    from fedkd.config import CONF_DIR

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


def payload_name(strategy: Any) -> str:
    """What travels: a codec, or one per direction when they differ."""
    up = strategy.get("codec")
    if up is None:
        return "float32 weights"
    down, size = strategy.get("download_codec") or up, strategy.get("download_size")
    if down == up and size is None:
        return str(up)
    return f"{up} up / {down} down" + (f" on {size} items" if size is not None else "")


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

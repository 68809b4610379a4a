"""How `fedkd-bench` times a workload: the simulator in a child process (with its
process tree's peak RSS), the compute bound in this process or on worker processes,
and the training floor. What the workload and machine are: simulations/bench_probes.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from simulations.bench_probes import TreeRSS

QUIET = ("output.plots=false", "output.progress=false", "output.checkpoint=false")


def steady(values: list[float]) -> float:
    """Mean over rounds after the first (the first warms caches and actors)."""
    rest = values[1:] or values
    return sum(rest) / len(rest)


def run_simulator(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """`fedkd-sim` with `overrides` in a child process, so that its start-up and its
    whole process tree (Ray workers included) are measured: steady round time, peak
    RSS, bytes per reply, client and server seconds."""
    cmd = [sys.executable, "-m", "simulations.run", *overrides, *QUIET, f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeRSS(proc.pid) as rss:
        _, err = proc.communicate()
    total = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(err[-4000:])
        raise SystemExit(proc.returncode)
    from fedkd.results import read_metrics

    rows = read_metrics(run_dir)
    rounds = [r["wall_seconds"] for r in rows]

    def per_reply(key: str) -> float:  # round 1 of a soft-label run has no teacher to send
        return steady([r[key] / r["replies"] if r.get("replies") else 0.0 for r in rows])

    return {
        "sim_round_seconds": steady(rounds),
        "sim_first_round_seconds": rounds[0],
        "sim_total_seconds": total,
        "startup_seconds": total - sum(rounds),
        "peak_rss_mb": rss.peak / 2**20,
        "bytes_up_per_client_round": per_reply("bytes_up"),
        "bytes_down_per_client_round": per_reply("bytes_down"),
        "sim_teacher_accuracy": [r["teacher_accuracy"] for r in rows],
        "sim_client_compute_seconds": steady(
            [r.get("client_compute_seconds") or 0.0 for r in rows]
        ),
        "sim_server_seconds": steady([r.get("server_seconds") or 0.0 for r in rows]),
    }


def run_bound(config_path: Path, work_dir: Path, processes: int = 1) -> dict[str, Any]:
    """The same rounds without the simulation engine: the round loop with the client
    function called directly. `processes=1`: in this process, torch on every core;
    more: the round's clients split over that many worker processes of one torch
    thread each, in groups as cohorts are (the tighter bound on a few cores)."""
    import resource

    import torch

    from fedkd.local_round import client_reply
    from fedkd.round_loop import DirectTransport, run_rounds

    torch.set_num_threads(os.cpu_count() or 1)
    cfg, state = _server_state(config_path, work_dir)
    rows = RowList()
    prefix = "bound" if processes == 1 else f"bound{processes}"
    if processes == 1:
        transport: Any = DirectTransport(lambda pid, content: client_reply(cfg, pid, content))
        run_rounds(state, transport, rows)
    else:
        with PoolTransport(cfg, processes) as transport:
            run_rounds(state, transport, rows)
    times = [r["wall_seconds"] for r in rows]
    return {
        f"{prefix}_round_seconds": steady(times),
        f"{prefix}_first_round_seconds": times[0],
        f"{prefix}_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        f"{prefix}_teacher_accuracy": [r.get("teacher_accuracy") for r in rows],
        f"{prefix}_torch_threads": torch.get_num_threads() if processes == 1 else 1,
    }


def _server_state(config_path: Path, work_dir: Path) -> tuple[dict[str, Any], Any]:
    """The simulator's run config (its client store moved to `work_dir`, no
    checkpoints) and a server state over its whole population."""
    import yaml

    from fedkd.server_state import build_server_state

    cfg = yaml.safe_load(config_path.read_text())
    cfg["simulation"]["client_state_dir"] = str(work_dir / "client_state")
    cfg["output"]["checkpoint"] = False
    state = build_server_state(cfg, "cpu")
    state.population = list(range(state.cfg.num_clients))
    return cfg, state


def _groups(downloads: list[tuple[int, Any]], processes: int) -> list[list[tuple[int, Any]]]:
    """A round's downloads in groups of partitions as cohorts take them (group k:
    k, k + n, ...), 4 groups per process."""
    from fedkd.cohort import NODES_PER_SLOT

    n = max(1, min(len(downloads), NODES_PER_SLOT * processes))
    return [g for k in range(n) if (g := [d for d in downloads if d[0] % n == k])]


_WORKER_CFG: dict[str, Any] = {}


def _init_worker(cfg: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER_CFG.update(cfg)


def _serve_group(group: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    from fedkd.local_round import client_reply

    memo: dict = {}  # the group's clients decode the broadcast once, as a cohort's do
    return [(pid, client_reply(_WORKER_CFG, pid, content, memo)) for pid, content in group]


def _train_group(group: list[tuple[int, Any]]) -> tuple[int, float]:
    """Only the local SGD of a group's clients (see `run_training_floor`); returns
    this process's id and the seconds it trained."""
    from fedkd.client_runtime import client_runtime
    from fedkd.local_round import new_student
    from fedkd.protocol import CONFIG, RoundPlan
    from fedkd.seeding import torch_generator
    from fedkd.training import train_student

    runtime = client_runtime(_WORKER_CFG)
    cfg, data = runtime.cfg, runtime.data
    busy = 0.0
    for pid, content in group:
        plan = RoundPlan.from_record(content.config_records[CONFIG])
        x, y = data.client_data(pid, plan.task)
        model = runtime.blank(cfg.model.student_of(pid), lambda p=pid: new_student(cfg, data, p))
        gen = torch_generator(cfg.seed, plan.round, pid, "local-train")
        start = time.perf_counter()
        train_student(model, x, y, plan.training, gen, device=runtime.device)
        busy += time.perf_counter() - start
    return os.getpid(), busy


def run_training_floor(config_path: Path, work_dir: Path, processes: int) -> dict[str, Any]:
    """The local SGD alone, for workloads whose clients train on their own data only
    (FedAvg): each round's sampled clients train on their shards with the plan's
    hyper-parameters and seeds in `processes` worker processes of one torch thread,
    and nothing else is timed (no client state, evaluation, encoding, messages or
    server; a worker's one model starts each client where the last one left it, as
    a step costs the same whatever the weights). A round's floor is the busiest
    process's summed training time: the round as if everything but the SGD were
    free, which no client runtime can beat without training differently."""
    import multiprocessing

    from fedkd.round_loop import prepare_round

    cfg, state = _server_state(config_path, work_dir)
    ctx = multiprocessing.get_context("spawn")
    floors = []
    with ctx.Pool(processes, initializer=_init_worker, initargs=(cfg,)) as pool:
        for rnd in range(1, state.cfg.rounds + 1):
            _, downloads = prepare_round(state, rnd)
            busy: dict[int, float] = {}
            for worker, seconds in pool.map(
                _train_group, _groups(downloads, processes), chunksize=1
            ):
                busy[worker] = busy.get(worker, 0.0) + seconds
            floors.append(max(busy.values()))
    return {f"floor{processes}_round_seconds": steady(floors)}


class PoolTransport:
    """The client function in `processes` worker processes (1 torch thread each); a
    round's clients go out in groups of partitions, 4 groups per process."""

    def __init__(self, cfg: dict[str, Any], processes: int) -> None:
        import multiprocessing

        self.processes = processes
        ctx = multiprocessing.get_context("spawn")  # no forked torch thread pools
        self.pool = ctx.Pool(processes, initializer=_init_worker, initargs=(cfg,))

    def exchange(self, rnd: int, downloads: list[tuple[int, Any]]) -> list[Any]:
        from fedkd.tally import Reply

        out = self.pool.map(_serve_group, _groups(downloads, self.processes), chunksize=1)
        return [Reply(pid, pid, content) for group in out for pid, content in group]

    def __enter__(self) -> PoolTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.close()
        self.pool.join()


class RowList(list):
    """A recorder that only keeps the rows."""

    def log_round(self, row: dict[str, Any]) -> None:
        self.append(row)


def parallel_efficiency(result: dict[str, Any]) -> float | None:
    """How busy the simulator kept its client slots: the summed client compute of a
    round over (slots x the round's client phase). 1.0 means no slot ever idled."""
    slots = (os.cpu_count() or 1) // max(1, result["sim_torch_threads_per_client"])
    client_phase = result["sim_round_seconds"] - result["sim_server_seconds"]
    if client_phase <= 0 or not result["sim_client_compute_seconds"]:
        return None
    return result["sim_client_compute_seconds"] / (max(1, slots) * client_phase)

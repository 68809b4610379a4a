"""A device's footprint: time and peak memory of one client's rounds, measured in a
process of its own that holds only what a SuperNode with its own data holds (its
shard as an .npz, the proxy bundle, its student).

The server side runs here, with a federation of that one client, so round 2 carries
real teacher soft labels. `fedkd-deploy footprint [OVERRIDE ...]` prints the result.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path
from typing import Any


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec;
    ru_maxrss (the fallback elsewhere) would include the parent's peak at fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _device(conn, cfg: dict, pid: int, threads: int) -> None:
    """The device process: answer (round, download) requests with replies."""
    import torch

    torch.set_num_threads(threads)
    from fedkd.local_round import client_reply

    conn.send(peak_rss_mb())  # after imports
    while (request := conn.recv()) is not None:
        start = time.perf_counter()
        reply = client_reply(cfg, pid, request)
        seconds = time.perf_counter() - start
        conn.send((reply, seconds, peak_rss_mb()))


class DeviceTransport:
    """The round loop's transport to the device process; notes each round's cost."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.per_round: list[dict[str, Any]] = []

    def exchange(self, rnd: int, downloads: list) -> list:
        from fedkd.protocol import TEACHER
        from fedkd.tally import Reply

        ((pid, content),) = downloads
        self.conn.send(content)
        reply, seconds, peak = self.conn.recv()
        teacher = TEACHER in content.array_records
        self.per_round.append(
            {"round": rnd, "seconds": seconds, "peak_rss_mb": peak, "teacher_labels": teacher}
        )
        return [Reply(pid, pid, reply)]


def measure(cfg: dict, partition: int = 0, rounds: int = 2, threads: int = 1) -> dict[str, Any]:
    from fedkd.data.device import write_bundle, write_shard
    from fedkd.round_loop import run_rounds
    from fedkd.server_state import build_server_state

    cfg = {**cfg, "rounds": rounds}
    with tempfile.TemporaryDirectory(prefix="fedkd-footprint-") as tmp:
        work = Path(tmp)
        samples = write_shard(cfg, partition, work / "shard.npz")
        write_bundle(cfg, work / "bundle.npz")
        device_cfg = {
            **cfg,
            "simulation": {**cfg["simulation"], "client_state_dir": str(work / "state")},
            "node": {
                "partition-id": partition,
                "data-path": str(work / "shard.npz"),
                "bundle": str(work / "bundle.npz"),
            },
        }
        state = build_server_state({**cfg, "output": {**cfg["output"], "checkpoint": False}}, "cpu")
        state.population = [partition]
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_device, args=(child, device_cfg, partition, threads), daemon=True
        )
        proc.start()
        idle_mb = parent.recv()
        transport = DeviceTransport(parent)
        try:
            run_rounds(state, transport, recorder=_Discard())
        finally:
            parent.send(None)
            proc.join(timeout=30)
    return {
        "student": cfg["model"]["student"],
        "partition": partition,
        "shard_samples": samples,
        "proxy_items": len(state.data.proxy_index),
        "torch_threads": threads,
        "rss_after_imports_mb": idle_mb,
        "rounds": transport.per_round,
    }


class _Discard:
    def log_round(self, row: dict[str, Any]) -> None:
        pass

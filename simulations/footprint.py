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
    from fedkd.client import client_reply

    conn.send(peak_rss_mb())  # after imports
    while (request := conn.recv()) is not None:
        start = time.perf_counter()
        reply = client_reply(cfg, pid, request)
        seconds = time.perf_counter() - start
        conn.send((reply, seconds, peak_rss_mb()))


def measure(cfg: dict, partition: int = 0, rounds: int = 2, threads: int = 1) -> dict[str, Any]:
    from fedkd.data.device import write_bundle, write_shard
    from fedkd.data.federated import federated_data
    from fedkd.protocol import TEACHER
    from strategies import ServerContext, build_strategy

    data = federated_data(cfg)
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
        server_cfg = {**cfg, "output": {**cfg["output"], "checkpoint": False}}
        strategy = build_strategy(server_cfg)
        strategy.setup(ServerContext(cfg=server_cfg, data=data, device="cpu", out_dir=work))
        strategy.connect({partition: partition})
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_device, args=(child, device_cfg, partition, threads), daemon=True
        )
        proc.start()
        idle_mb = parent.recv()
        per_round = []
        try:
            for rnd in range(1, rounds + 1):
                ((pid, content),) = strategy.prepare_round(rnd)
                parent.send(content)
                reply, seconds, peak = parent.recv()
                replies = [strategy.parse_reply(pid, reply)]
                strategy.conclude(rnd, replies, failed=0, rejected=0, late=0, bytes_up=0)
                per_round.append(
                    {
                        "round": rnd,
                        "seconds": seconds,
                        "peak_rss_mb": peak,
                        "teacher_labels": TEACHER in content.array_records,
                    }
                )
        finally:
            parent.send(None)
            proc.join(timeout=30)
    return {
        "student": cfg["model"]["student"],
        "partition": partition,
        "shard_samples": samples,
        "proxy_items": len(data.proxy_index),
        "torch_threads": threads,
        "rss_after_imports_mb": idle_mb,
        "rounds": per_round,
    }

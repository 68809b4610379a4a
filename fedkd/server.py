"""The Flower ServerApp: build the server state, meet the clients, run the rounds.

Before round 1 the server waits until every expected node has registered (with
`run_simulation`, nodes register while the ServerApp starts) and asks each node
which partition it holds, because sampling is over partition ids while node ids are
random.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedkd.checkpoint import load_checkpoint
from fedkd.errors import FedKDError
from fedkd.protocol import CONFIG, INFO, METRICS, QUERY
from fedkd.resources import visible_gpus
from fedkd.results.progress import RoundProgress
from fedkd.results.recorder import RunRecorder
from fedkd.round_loop import GridTransport, error_summary, run_rounds
from fedkd.server_state import build_server_state

log = logging.getLogger("fedkd.server")


class FederationError(FedKDError):
    """The federation could not be formed (nodes missing, partitions inconsistent)."""


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} of num_clients={expected} nodes registered within "
                f"simulation.register_timeout={timeout}s"
            )
        time.sleep(0.2)


def discover_partitions(
    grid: Grid, nodes: list[int], expected: int, timeout: float, proxy_digest: str
) -> dict[int, int]:
    """Ask every node for its partition id; return {node id: partition id} of the
    nodes that answered with the server's proxy set. A node that fails the handshake
    (missing data, wrong settings, another proxy set) is left out with a warning."""
    messages = [
        Message(
            RecordDict({CONFIG: ConfigRecord({"want": "partition-id"})}),
            dst_node_id=n,
            message_type=QUERY,
        )
        for n in nodes
    ]
    partitions: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            log.warning(
                "node %s failed the handshake and is left out: %s",
                reply.metadata.src_node_id,
                error_summary(reply.error.reason),
            )
            continue
        pid = int(reply.content.metric_records[METRICS]["partition-id"])
        theirs = reply.content.config_records[INFO]["proxy-digest"]
        if theirs != proxy_digest:
            log.warning(
                "node %s (partition %d) holds another proxy set (digest %s, the server's %s); "
                "it is left out",
                reply.metadata.src_node_id,
                pid,
                theirs,
                proxy_digest,
            )
            continue
        if pid in partitions.values():
            raise FederationError(f"two nodes claim partition {pid}")
        partitions[reply.metadata.src_node_id] = pid
    missing = sorted(set(range(expected)) - set(partitions.values()))
    if missing:
        log.warning(
            "no node holds partition(s) %s; sampling uses the %d that answered",
            missing[:10],
            len(partitions),
        )
    if not partitions:
        raise FederationError("no node answered the partition handshake")
    return partitions


def run_server(
    grid: Grid, plain: dict[str, Any], out_dir: str | Path, resume: bool = False
) -> dict[str, Any]:
    """Run a whole experiment on `grid` (with `resume`, from the run directory's
    checkpoint on); returns the summary (also in summary.json)."""
    out = Path(out_dir)
    ckpt = load_checkpoint(out, plain) if resume else None
    device = "cuda" if visible_gpus() > 0 else "cpu"
    state = build_server_state(plain, device)
    cfg, data = state.cfg, state.data
    sim = cfg.simulation
    if sim.fast_dispatch and hasattr(grid, "pull_interval"):
        grid.pull_interval = 0.01  # Flower's in-memory grid polls for replies every 0.1 s
    partitions: dict[int, int] = {}
    nodes: list[int] = []
    if state.strategy.uses_clients:
        nodes = wait_for_nodes(grid, cfg.num_clients, sim.register_timeout)
        partitions = discover_partitions(
            grid, nodes, cfg.num_clients, sim.register_timeout, data.proxy_digest
        )
    state.population = sorted(partitions.values())
    meta = {
        "strategy": state.strategy.name,
        "seed": cfg.seed,
        "dataset": cfg.dataset.name,
        "num_clients": cfg.num_clients,
        "clients_per_round": cfg.clients_per_round,
        "lifelong": cfg.lifelong.name,
        "mitigation": state.mitigation.name,
        "proxy_mode": cfg.lifelong.proxy,
        "num_tasks": data.num_tasks,
        "nodes": len(nodes),
        "nodes_admitted": len(partitions),
    }
    progress = None
    if cfg.output.progress:
        title = f"fedkd: {state.strategy.name} on {cfg.dataset.name}, {cfg.num_clients} clients"
        if data.stream.lifelong:
            title += f", {cfg.lifelong.name} ({data.num_tasks} tasks, "
            title += f"mitigation {state.mitigation.name})"
        progress = RoundProgress(cfg.rounds, title)
    if ckpt is not None:
        state.load_state_dict(ckpt)
        log.info("resuming %s after round %d", out, ckpt["round"])
    recorder = RunRecorder(
        out, meta, progress=progress, plots=cfg.output.plots, resume_round=state.round
    )
    if progress is not None:
        for row in recorder.rows:
            progress.round(row)
    transport = GridTransport(grid, partitions, sim.round_timeout)
    lifelong = run_rounds(state, transport, recorder, out)
    return recorder.finish(lifelong)


def build_server_app(cfg: dict[str, Any], out_dir: str | Path, resume: bool = False) -> ServerApp:
    """A ServerApp bound to a resolved config and an output directory (simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg, out_dir, resume)

    return app

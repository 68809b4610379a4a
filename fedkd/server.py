"""The Flower ServerApp: build the server state, meet the clients, run the rounds.

Before round 1 the server waits until every expected node has registered (with
`run_simulation`, nodes register while the ServerApp starts) and asks each node
which partition it holds, because sampling is over partition ids while node ids are
random (fedkd/admission.py: the checks, and in deployment the key binding).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedkd.admission import NONCE_BYTES, PartitionKeys, Refused, declared_examples, read_claim
from fedkd.checkpoint import load_checkpoint
from fedkd.cohort import COHORT, PER_CLIENT, CohortTransport, discover_cohorts
from fedkd.errors import FedKDError
from fedkd.protocol import CONFIG, QUERY
from fedkd.resources import visible_gpus
from fedkd.results.progress import RoundProgress
from fedkd.results.recorder import RunRecorder
from fedkd.round_loop import GridTransport, Transport, run_rounds
from fedkd.server_state import build_server_state

log = logging.getLogger("fedkd.server")


class FederationError(FedKDError):
    """The federation could not be formed (nodes missing, partitions inconsistent)."""


def wait_for_nodes(
    grid: Grid, expected: int, timeout: float, what: str = "num_clients"
) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} of {what}={expected} nodes registered within "
                f"simulation.register_timeout={timeout}s"
            )
        time.sleep(0.2)


def discover_partitions(
    grid: Grid,
    nodes: list[int],
    expected: int,
    timeout: float,
    proxy_digest: str,
    keys: PartitionKeys | None = None,
    run_id: int = 0,
    shard_sizes: dict[int, int] | None = None,
) -> dict[int, int]:
    """Ask every node for its partition id; return {node id: partition id} of the
    nodes admitted (and fill `shard_sizes`, partition id -> the number of examples
    its node declared, when given). A node that fails the handshake (an error, a malformed reply,
    another proxy set, with `keys` a claim its key does not prove) is left out with a
    warning, and so is every claimant of a partition two nodes claim: no reply can
    stop the federation from forming."""
    nonces = {n: os.urandom(NONCE_BYTES) for n in nodes}  # fresh: a signature cannot be replayed
    messages = [
        Message(
            RecordDict({CONFIG: ConfigRecord({"want": "partition-id", "nonce": nonces[n]})}),
            dst_node_id=n,
            message_type=QUERY,
        )
        for n in nodes
    ]
    claims: dict[int, list[int]] = {}  # partition id -> the nodes that proved a claim
    answered: set[int] = set()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        try:
            if node in answered:
                raise Refused("it answered twice")
            answered.add(node)
            pid = read_claim(reply, expected, proxy_digest, nonces.get(node), run_id, keys)
            declared = declared_examples(reply)
        except Refused as exc:
            log.warning("node %s failed the handshake and is left out: %s", node, exc)
            continue
        except Exception as exc:  # any other fault in a reply: that node is out
            log.warning(
                "node %s failed the handshake and is left out: malformed reply (%s: %s)",
                node,
                type(exc).__name__,
                str(exc)[:200],
            )
            continue
        claims.setdefault(pid, []).append(node)
        if shard_sizes is not None and declared is not None:
            shard_sizes[pid] = declared
    partitions: dict[int, int] = {}
    for pid, claimants in sorted(claims.items()):
        if len(claimants) > 1:
            log.warning(
                "nodes %s all claim partition %d; none of them is admitted%s",
                sorted(claimants),
                pid,
                "" if keys else " (bind partitions to node keys with run config partition-keys)",
            )
            continue
        partitions[claimants[0]] = pid
    missing = sorted(set(range(expected)) - set(partitions.values()))
    if missing:
        log.warning(
            "no node holds partition(s) %s; sampling uses the %d admitted",
            missing[:10],
            len(partitions),
        )
    if not partitions:
        raise FederationError("no node passed the partition handshake")
    return partitions


def run_server(
    grid: Grid,
    plain: dict[str, Any],
    out_dir: str | Path,
    resume: bool = False,
    keys: PartitionKeys | None = None,
    run_id: int = 0,
) -> dict[str, Any]:
    """Run a whole experiment on `grid` (with `resume`, from the run directory's
    checkpoint on; with `keys`, admitting only nodes whose key proves their
    partition in run `run_id`); returns the summary (also in summary.json)."""
    out = Path(out_dir)
    ckpt = load_checkpoint(out, plain) if resume else None
    device = "cuda" if visible_gpus() > 0 else "cpu"
    state = build_server_state(plain, device)
    cfg, data = state.cfg, state.data
    sim = cfg.simulation
    if sim.fast_dispatch and hasattr(grid, "pull_interval"):
        grid.pull_interval = 0.01  # Flower's in-memory grid polls for replies every 0.1 s
    cohort = sim.execution == COHORT  # fedkd/cohort.py (set by fedkd-sim only)
    cohorts: dict[int, list[int]] = {}  # node id -> the partitions it serves
    nodes: list[int] = []
    if state.strategy.uses_clients and cohort:
        nodes = wait_for_nodes(grid, sim.cohort_nodes, sim.register_timeout, "cohort_nodes")
        cohorts = discover_cohorts(
            grid,
            nodes,
            cfg.num_clients,
            sim.register_timeout,
            data.proxy_digest,
            shard_sizes=state.declared_examples,
        )
    elif state.strategy.uses_clients:
        nodes = wait_for_nodes(grid, cfg.num_clients, sim.register_timeout)
        partitions = discover_partitions(
            grid,
            nodes,
            cfg.num_clients,
            sim.register_timeout,
            data.proxy_digest,
            keys,
            run_id,
            shard_sizes=state.declared_examples,
        )
        cohorts = {node: [pid] for node, pid in partitions.items()}
    state.population = sorted(pid for pids in cohorts.values() for pid in pids)
    state.privacy.set_population(len(state.population))  # DP sampling over those admitted
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
        "nodes_admitted": len(cohorts),
        "execution": COHORT if cohort else PER_CLIENT,
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
    if cohort:
        transport: Transport = CohortTransport(grid, cohorts, sim.round_timeout)
    else:
        partitions = {node: pids[0] for node, pids in cohorts.items()}
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

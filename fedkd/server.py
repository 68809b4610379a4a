"""The Flower ServerApp: build the server state, meet the clients, run the rounds.

Before round 1 the server waits until every expected node has registered (with
`run_simulation`, nodes register while the ServerApp starts) and asks each node
which partition it holds, because sampling is over partition ids while node ids are
random (fedkd/admission.py: the checks, and in deployment the key binding).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedkd.admission import FederationError, Handshake, admit
from fedkd.checkpoint import load_checkpoint
from fedkd.cohort import COHORT, PER_CLIENT, CohortTransport, discover_cohorts
from fedkd.partition_keys import PartitionKeys
from fedkd.privacy.release import shard_size
from fedkd.resources import visible_gpus
from fedkd.results.progress import RoundProgress
from fedkd.results.recorder import RunRecorder
from fedkd.round_loop import GridTransport, Transport, run_rounds
from fedkd.server_state import ServerState, build_server_state

log = logging.getLogger("fedkd.server")


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
    max_examples: int | None = None,
    known_sizes: Sequence[int] | None = None,
) -> dict[int, int]:
    """Ask every node for its partition id; return {node id: partition id} of the
    nodes admitted, and fill `shard_sizes` (partition id -> the shard size its node
    declared, capped at `max_examples` and `known_sizes[pid]`) when given. The
    rules, and who is left out, are fedkd.admission.admit's."""
    rules = Handshake(expected, proxy_digest, keys, run_id, False, max_examples, known_sizes)
    admitted = admit(grid, nodes, timeout, rules, shard_sizes)
    return {node: pids[0] for node, pids in admitted.items()}


def known_shard_sizes(state: ServerState) -> list[int]:
    """The shard size each simulated client declares (fedkd.client.handle_query):
    the server holds the same split, so no simulated node may declare more."""
    mode = state.cfg.privacy.mode
    return [shard_size(mode, len(shard)) for shard in state.data.shards]


def meet_nodes(
    grid: Grid,
    state: ServerState,
    keys: PartitionKeys | None,
    run_id: int,
    max_examples: int | None,
    simulated: bool,
) -> tuple[list[int], dict[int, list[int]]]:
    """Wait for the nodes and admit them: (the node ids registered, {node id: the
    partitions it serves}); declared shard sizes go to state.declared_examples,
    capped at `max_examples` and, when `simulated`, at what the server's own split
    gives each partition."""
    cfg, sim = state.cfg, state.cfg.simulation
    if not state.strategy.uses_clients:
        return [], {}
    known = known_shard_sizes(state) if simulated else None
    digest, sizes = state.data.proxy_digest, state.declared_examples
    if sim.execution == COHORT:
        nodes = wait_for_nodes(grid, sim.cohort_nodes, sim.register_timeout, "cohort_nodes")
        cohorts = discover_cohorts(
            grid,
            nodes,
            cfg.num_clients,
            sim.register_timeout,
            digest,
            sizes,
            max_examples,
            known,
            keys,
            run_id,
        )
        return nodes, cohorts
    nodes = wait_for_nodes(grid, cfg.num_clients, sim.register_timeout)
    partitions = discover_partitions(
        grid,
        nodes,
        cfg.num_clients,
        sim.register_timeout,
        digest,
        keys,
        run_id,
        shard_sizes=sizes,
        max_examples=max_examples,
        known_sizes=known,
    )
    return nodes, {node: [pid] for node, pid in partitions.items()}


def run_meta(state: ServerState, nodes: list[int], cohorts: dict[int, list[int]]) -> dict[str, Any]:
    """What the run was, for the recorder's summary: the config that picked it and
    how many nodes registered and were admitted."""
    cfg = state.cfg
    return {
        "strategy": state.strategy.name,
        "seed": cfg.seed,
        "dataset": cfg.dataset.name,
        "num_clients": cfg.num_clients,
        "clients_per_round": cfg.clients_per_round,
        "lifelong": cfg.lifelong.name,
        "mitigation": state.mitigation.name,
        "proxy_mode": cfg.lifelong.proxy,
        "num_tasks": state.data.num_tasks,
        "nodes": len(nodes),
        "nodes_admitted": len(cohorts),
        "execution": COHORT if cfg.simulation.execution == COHORT else PER_CLIENT,
    }


def round_progress(state: ServerState) -> RoundProgress | None:
    """The live progress display (output.progress), titled with what runs."""
    cfg, data = state.cfg, state.data
    if not cfg.output.progress:
        return None
    title = f"fedkd: {state.strategy.name} on {cfg.dataset.name}, {cfg.num_clients} clients"
    if data.stream.lifelong:
        title += f", {cfg.lifelong.name} ({data.num_tasks} tasks, "
        title += f"mitigation {state.mitigation.name})"
    return RoundProgress(cfg.rounds, title)


def make_transport(grid: Grid, state: ServerState, cohorts: dict[int, list[int]]) -> Transport:
    """How rounds reach the admitted nodes: a message per cohort node carrying its
    partitions (fedkd/cohort.py; cohorts are set by fedkd-sim only), or a message
    per client."""
    sim = state.cfg.simulation
    if sim.execution == COHORT:
        return CohortTransport(grid, cohorts, sim.round_timeout)
    partitions = {node: pids[0] for node, pids in cohorts.items()}
    return GridTransport(grid, partitions, sim.round_timeout)


def run_server(
    grid: Grid,
    plain: dict[str, Any],
    out_dir: str | Path,
    resume: bool = False,
    keys: PartitionKeys | None = None,
    run_id: int = 0,
    max_examples: int | None = None,
    simulated: bool = False,
) -> dict[str, Any]:
    """Run a whole experiment on `grid` (with `resume`, from the run directory's
    checkpoint on; with `keys`, admitting only nodes whose key proves their
    partition in run `run_id`); returns the summary (also in summary.json). A
    node's declared shard size is capped at `max_examples` (deployment: run config
    max-examples) and, when `simulated`, at its partition's size in the server's
    own split (the simulated nodes hold that split)."""
    out = Path(out_dir)
    ckpt = load_checkpoint(out, plain) if resume else None
    device = "cuda" if visible_gpus() > 0 else "cpu"
    state = build_server_state(plain, device)
    if state.cfg.simulation.fast_dispatch and hasattr(grid, "pull_interval"):
        grid.pull_interval = 0.01  # Flower's in-memory grid polls for replies every 0.1 s
    nodes, cohorts = meet_nodes(grid, state, keys, run_id, max_examples, simulated)
    state.population = sorted(pid for pids in cohorts.values() for pid in pids)
    state.privacy.set_population(len(state.population))  # DP sampling over those admitted
    meta = run_meta(state, nodes, cohorts)
    progress = round_progress(state)
    if ckpt is not None:
        state.load_state_dict(ckpt)
        log.info("resuming %s after round %d", out, ckpt["round"])
    recorder = RunRecorder(
        out,
        meta,
        progress=progress,
        plots=state.cfg.output.plots,
        resume_round=state.round,
        config=plain,  # its `logger` section: the experiment trackers
    )
    if progress is not None:
        for row in recorder.rows:
            progress.round(row)
    lifelong = run_rounds(state, make_transport(grid, state, cohorts), recorder, out)
    return recorder.finish(lifelong)


def build_server_app(cfg: dict[str, Any], out_dir: str | Path, resume: bool = False) -> ServerApp:
    """A ServerApp bound to a resolved config and an output directory (simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg, out_dir, resume, simulated=True)

    return app

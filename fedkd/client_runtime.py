"""What a client process loads once and reuses for every client it serves: the
config, the data (simulated partitions, or a device's own), the client store, the
device, the strategy's client half and the mitigation (`client_runtime`), and where
it runs (`worker_info`).
fedkd/local_round.py does one client's round with it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedkd.client_store import ClientStore
from fedkd.config import FedKDConfig, typed
from fedkd.data.device import device_federated_data
from fedkd.data.federated import FederatedData, federated_data
from fedkd.mitigations import Mitigation, build_mitigation
from fedkd.resources import client_device, in_ray_worker
from strategies.client_half import ClientHalf


@dataclass
class ClientRuntime:
    """What a worker process loads once and reuses for every client it serves."""

    cfg: FedKDConfig
    data: FederatedData
    store: ClientStore
    device: str
    mitigation: Mitigation
    algorithm: ClientHalf  # the strategy's client half: loss terms and reply
    blanks: dict[str, nn.Module] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)  # where this worker runs
    ledger: tuple[str, int] | None = None  # a device's DP ledger (state-dir, partition)

    def blank(self, arch: str, build: Callable[[], nn.Module]) -> nn.Module:
        """This worker's reusable module of architecture `arch`: its weights are
        overwritten before use, and a worker serves one client at a time."""
        if arch not in self.blanks:
            self.blanks[arch] = build()
        return self.blanks[arch]


@lru_cache(maxsize=2)
def _runtime(cfg_key: str) -> ClientRuntime:
    plain = json.loads(cfg_key)
    cfg = typed(plain)
    sim = cfg.simulation
    if in_ray_worker():
        torch.set_num_threads(sim.num_cpus)
    store_dir = sim.client_state_dir or str(Path.cwd() / "client_state")
    node = plain.get("node") or {}  # set by fedkd.app on a SuperNode (data-path: its own data)
    if node.get("data-path"):
        data = device_federated_data(plain, node["partition-id"], node["data-path"], node["bundle"])
    else:
        data = federated_data(plain)
    device = client_device(float(sim.num_gpus))
    # a device's store is fsynced; a simulation's needs only whole files (a killed
    # process leaves the previous state), not survival of a machine crash
    store = ClientStore(store_dir, durable=bool(node))
    # a device tells the server nothing about its host (it names no Ray node either)
    info = {} if node else worker_info()
    ledger = tuple(node["ledger"]) if node.get("ledger") else None
    mitigation, algorithm = build_mitigation(cfg), client_half(cfg)
    return ClientRuntime(cfg, data, store, device, mitigation, algorithm, info=info, ledger=ledger)


def client_half(cfg: FedKDConfig) -> ClientHalf:
    """The configured strategy's client half, with the strategy's own settings."""
    from fedkd.components import component_params
    from strategies import STRATEGIES

    cls, params = component_params(STRATEGIES, cfg, "strategy")
    return cls.client(cfg, params)


_LAST: list[Any] = [None, None]  # (plain config, its runtime): the same dict every call


def client_runtime(plain: dict[str, Any]) -> ClientRuntime:
    """This process's runtime for the plain config, built on the first call (a
    ClientApp passes the same dict every time; keying it costs a JSON dump)."""
    if _LAST[0] is plain:
        return _LAST[1]
    from fedkd.registry import import_plugins

    import_plugins(plain.get("plugins") or [])  # before the mitigation is looked up
    runtime = _runtime(json.dumps(plain, sort_keys=True))
    _LAST[:] = [plain, runtime]
    return runtime


def shard_size(plain: dict[str, Any], pid: int, task: int) -> int:
    """How many private examples partition `pid` trains on in `task` (on a device:
    its own data), before any plan is served."""
    return len(client_runtime(plain).data.client_data(pid, task)[1])


def worker_info() -> dict[str, str]:
    """Where this client ran: the host and, in simulation, the Ray node."""
    info = {"host": socket.gethostname(), "ray-node": ""}
    if in_ray_worker():
        import ray

        info["ray-node"] = ray.get_runtime_context().get_node_id()
    return info

"""The Flower app behind `flwr run`: the simulation's ServerApp and ClientApp, with
their config composed from conf/ by the run config's Hydra `overrides`.

    flwr run . local --run-config 'overrides="strategy=fedmd rounds=5"'

Server and every SuperNode compose the same config from the same `overrides`, so
they agree on the experiment as they do in `fedkd-sim`. A SuperNode's node config
says where its data is and what it agrees to do (see `NodeSettings`); results go
to `out-dir` on the server, and run config `partition-keys` (the file `fedkd-deploy
keys` writes) binds each partition to its node's key (fedkd/admission.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from fedkd.compose import compose_config
from fedkd.config import typed
from fedkd.errors import ConfigError, FedKDError
from fedkd.node_policy import NodePolicy
from fedkd.protocol import CONFIG, RoundPlan
from fedkd.resources import resolve_num_gpus

log = logging.getLogger("fedkd.app")

DEFAULT_OUT_DIR = "outputs/flwr"
DEFAULT_STATE_DIR = "~/.cache/fedkd/client_state"


@lru_cache(maxsize=4)
def run_cfg(overrides: str) -> dict[str, Any]:
    """The validated plain config for a run's `overrides` (composed once per process)."""
    cfg = compose_config(overrides)
    sim = cfg["simulation"]
    sim["num_gpus"] = resolve_num_gpus(sim["num_gpus"], int(sim["num_cpus"]))
    return cfg


def _overrides(context: Context) -> str:
    value = context.run_config.get("overrides", "")
    if not isinstance(value, str):
        raise ConfigError("overrides", value, "a string of Hydra overrides")
    return value


# ---------------------------------------------------------------------------- server
server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    from fedkd.admission import PartitionKeys
    from fedkd.server import run_server

    try:
        cfg = run_cfg(_overrides(context))
        keys_file = str(context.run_config.get("partition-keys") or "")
        keys = PartitionKeys.load(keys_file) if keys_file else None
        out = Path(str(context.run_config.get("out-dir") or DEFAULT_OUT_DIR))
        out = (out / f"run-{context.run_id}").resolve()
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
        log.warning("fedkd: run %s writes its results to %s", context.run_id, out)
        if keys is not None:
            log.warning("fedkd: partitions bound to %d node keys (%s)", len(keys.by_key), keys_file)
        run_server(grid, cfg, out, keys=keys, run_id=context.run_id)
    except FedKDError as exc:
        log.error("fedkd: %s", exc)  # one line in the run's log, no traceback
        raise SystemExit(2) from None


# ---------------------------------------------------------------------------- client
@dataclass(frozen=True)
class NodeSettings:
    """A SuperNode's `--node-config`.

    partition-id    this node's id in the federation (0..num_clients-1); required
    num-partitions  checked against the run's num_clients when given (by the
                    handshake, fedkd.client.handle_query, as in simulation)
    data-path       the device's own data (.npz with x and y, or a directory of
                    class sub-directories); without it, the node holds partition
                    `partition-id` of the configured built-in dataset
    bundle          the proxy bundle from `fedkd-deploy bundle`; needed with data-path
    state-dir       where the node keeps its student between rounds
    auth-key        the SuperNode's private key (--auth-supernode-private-key): the
                    node signs its partition claim with it (fedkd/admission.py)
    allow-replies, max-epochs, max-batch-size, min-privacy, min-noise-multiplier
                    what the node agrees to do (fedkd/node_policy.py)
    """

    partition_id: int
    data_path: str
    bundle: str
    state_dir: str
    auth_key: str = ""
    policy: NodePolicy = field(default_factory=NodePolicy)

    KEYS = (
        "partition-id",
        "num-partitions",
        "data-path",
        "bundle",
        "state-dir",
        "auth-key",
        *NodePolicy.KEYS,
    )

    @classmethod
    def parse(cls, node_config: dict[str, Any]) -> NodeSettings:
        unknown = sorted(set(node_config) - set(cls.KEYS))
        if unknown:
            raise ConfigError("node config", ", ".join(unknown), "keys " + ", ".join(cls.KEYS))
        if "partition-id" not in node_config:
            raise ConfigError("node config", "no partition-id", "partition-id=<0..N-1>")
        settings = cls(
            partition_id=int(node_config["partition-id"]),
            data_path=str(node_config.get("data-path", "")),
            bundle=str(node_config.get("bundle", "")),
            state_dir=str(node_config.get("state-dir", DEFAULT_STATE_DIR)),
            auth_key=str(node_config.get("auth-key", "")),
            policy=NodePolicy.parse(node_config),
        )
        if settings.data_path and not settings.bundle:
            raise ConfigError(
                "node config bundle",
                "(missing)",
                "a bundle file (fedkd-deploy bundle) next to data-path",
            )
        return settings


def node_cfg(context: Context) -> dict[str, Any]:
    """The run's config as this node runs it: its data source and state directory."""
    node = NodeSettings.parse(dict(context.node_config))
    cfg = dict(run_cfg(_overrides(context)))
    cfg["simulation"] = dict(cfg["simulation"])
    state = Path(node.state_dir).expanduser() / f"run-{context.run_id}"
    cfg["simulation"]["client_state_dir"] = str(state)
    # the noise a device adds to protect its data is secret, whatever the server's
    # config says: replayable noise is for simulation studies only
    cfg["privacy"] = {**cfg["privacy"], "secure_noise": True}
    # a device (fedkd.local_round: its store is fsynced); the same for every node
    # without data of its own, so that nodes sharing a process share one runtime
    cfg["node"] = {"device": True}
    if node.data_path:
        cfg["node"] = {
            "device": True,
            "partition-id": node.partition_id,
            "data-path": str(Path(node.data_path).expanduser().resolve()),
            "bundle": str(Path(node.bundle).expanduser().resolve()),
        }
    return cfg


@lru_cache(maxsize=4)
def _client_app(cfg_key: str) -> ClientApp:
    import torch

    from fedkd.client import build_client_app

    cfg = json.loads(cfg_key)
    # As a simulated client does: simulation.num_cpus torch threads (and the same sums)
    torch.set_num_threads(typed(cfg).simulation.num_cpus)
    return build_client_app(cfg)


def _delegate(message: Message, context: Context) -> Message:
    return _client_app(json.dumps(node_cfg(context), sort_keys=True))(message, context)


client_app = ClientApp()


@client_app.query()
def client_query(message: Message, context: Context) -> Message:
    return _delegate(message, context)


@client_app.train()
def client_train(message: Message, context: Context) -> Message:
    # the device's policy first: a plan outside it is refused before any training
    policy = NodeSettings.parse(dict(context.node_config)).policy
    plan = RoundPlan.from_record(message.content.config_records[CONFIG])
    policy.check(plan, typed(run_cfg(_overrides(context))))
    return _delegate(message, context)

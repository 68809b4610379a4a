"""The Flower app behind `flwr run`: the simulation's ServerApp and ClientApp, with
their config composed from conf/ by the run config's `overrides`.

    flwr run . local --run-config 'overrides="strategy=fedmd rounds=5"'

The server composes its config from the `overrides` as `fedkd-sim` would. A
SuperNode answers to its owner: it takes from the run only the plain experiment
settings fedkd/node_config.py allows, under its owner's config file, checks the
run and every round's plan against its policy (fedkd/node_policy.py) and admits
each round to its ledger (fedkd/node_ledger.py) before any training, and sends
back no text it read on the device (`guarded`). Results go to `out-dir` on the
server; run config `partition-keys` (the file `fedkd-deploy keys` writes) binds
each partition to its node's key (fedkd/admission.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable
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
from fedkd.node_config import RunRefused, compose_node_config
from fedkd.node_policy import NodePolicy
from fedkd.protocol import CONFIG, InvalidPlan, RoundPlan
from fedkd.resources import resolve_num_gpus

log = logging.getLogger("fedkd.app")

DEFAULT_OUT_DIR = "outputs/flwr"
DEFAULT_STATE_DIR = "~/.cache/fedkd/client_state"
# a node's declared shard size counts at most this (run config max-examples): in
# deployment nobody else knows a device's data, so a node cannot claim to be the
# whole federation (fedkd/admission.py); in simulation the known partition sizes cap it
DEFAULT_MAX_EXAMPLES = 100_000


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
    from fedkd.atomic import write_text_atomic
    from fedkd.server import run_server

    try:
        cfg = run_cfg(_overrides(context))
        keys_file = str(context.run_config.get("partition-keys") or "")
        keys = PartitionKeys.load(keys_file) if keys_file else None
        limit = context.run_config.get("max-examples", DEFAULT_MAX_EXAMPLES)
        if type(limit) is not int or limit < 1:
            raise ConfigError("max-examples", limit, "an integer >= 1")
        out = Path(str(context.run_config.get("out-dir") or DEFAULT_OUT_DIR))
        out = (out / f"run-{context.run_id}").resolve()
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(cfg)))
        log.warning("fedkd: run %s writes its results to %s", context.run_id, out)
        if keys is not None:
            log.warning("fedkd: partitions bound to %d node keys (%s)", len(keys.by_key), keys_file)
        run_server(grid, cfg, out, keys=keys, run_id=context.run_id, max_examples=limit)
    except FedKDError as exc:
        log.error("fedkd: %s", exc)  # one line in the run's log, no traceback
        raise SystemExit(2) from None


# ---------------------------------------------------------------------------- client
@dataclass(frozen=True)
class NodeSettings:
    """A SuperNode's `--node-config`: the owner's, never the run's.

    partition-id    this node's id in the federation (0..num_clients-1); required
    num-partitions  checked against the run's num_clients when given (by the
                    handshake, fedkd.client.handle_query, as in simulation)
    data-path       the device's own data (.npz with x and y, or a directory of
                    class sub-directories); without it, the node holds partition
                    `partition-id` of the configured built-in dataset
    bundle          the proxy bundle from `fedkd-deploy bundle`; needed with data-path
    state-dir       where the node keeps its students and its round ledger
    auth-key        the SuperNode's private key (--auth-supernode-private-key): the
                    node signs its partition claim with it (fedkd/admission.py)
    config          the owner's config file (fedkd/node_config.py): what the run's
                    settings never override (data root, plugins, faults, resources)
    allow-replies, max-*, min-privacy, min-noise-multiplier, max-epsilon
                    what the node agrees to do (fedkd/node_policy.py)
    """

    partition_id: int
    data_path: str
    bundle: str
    state_dir: str
    auth_key: str = ""
    config: str = ""
    policy: NodePolicy = field(default_factory=NodePolicy)

    KEYS = (
        "partition-id",
        "num-partitions",
        "data-path",
        "bundle",
        "state-dir",
        "auth-key",
        "config",
        *NodePolicy.KEYS,
    )

    @classmethod
    def parse(cls, node_config: dict[str, Any]) -> NodeSettings:
        unknown = sorted(set(node_config) - set(cls.KEYS))
        if unknown:
            raise ConfigError("node config", ", ".join(unknown), "keys " + ", ".join(cls.KEYS))
        if type(node_config.get("partition-id")) is not int:
            raise ConfigError("node config", "no partition-id", "partition-id=<0..N-1>")
        settings = cls(
            partition_id=node_config["partition-id"],
            data_path=str(node_config.get("data-path", "")),
            bundle=str(node_config.get("bundle", "")),
            state_dir=str(node_config.get("state-dir", DEFAULT_STATE_DIR)),
            auth_key=str(node_config.get("auth-key", "")),
            config=str(node_config.get("config", "")),
            policy=NodePolicy.parse(node_config),
        )
        if settings.data_path and not settings.bundle:
            raise ConfigError(
                "node config bundle",
                "(missing)",
                "a bundle file (fedkd-deploy bundle) next to data-path",
            )
        return settings


@lru_cache(maxsize=4)
def _node_config(overrides: str, config_file: str, _stamp: tuple) -> dict[str, Any]:
    return compose_node_config(overrides, config_file)


def requested_cfg(context: Context, node: NodeSettings) -> dict[str, Any]:
    """The run's config as this node would run it, before its policy is checked:
    fedkd's defaults, the run's allowed settings, the owner's file (node_config)."""
    overrides = context.run_config.get("overrides", "")
    stamp: tuple = ()
    if node.config:
        with contextlib.suppress(OSError):  # a changed file is read again
            st = Path(node.config).expanduser().stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    if not isinstance(overrides, str):
        raise RunRefused("this node refuses the run config: 'overrides' must be a string")
    return _node_config(overrides, node.config, stamp)


def node_cfg(context: Context, node: NodeSettings | None = None) -> dict[str, Any]:
    """The config this node runs, once the run passed its policy: its data source,
    its state directory and ledger, secret DP noise."""
    node = node or NodeSettings.parse(dict(context.node_config))
    cfg = dict(requested_cfg(context, node))
    broken = node.policy.run_violations(typed(cfg))
    if broken:
        raise RunRefused("this node's policy refuses the run: " + "; ".join(broken))
    cfg["simulation"] = dict(cfg["simulation"])
    cfg["simulation"]["num_gpus"] = resolve_num_gpus(
        cfg["simulation"]["num_gpus"], int(cfg["simulation"]["num_cpus"])
    )
    state_dir = Path(node.state_dir).expanduser()
    cfg["simulation"]["client_state_dir"] = str(state_dir / f"run-{context.run_id}")
    # the noise a device adds to protect its data is secret, whatever the server's
    # config says: replayable noise is for simulation studies only
    cfg["privacy"] = {**cfg["privacy"], "secure_noise": True}
    # a device (fedkd.local_round: its store is fsynced, its DP spending is the
    # ledger's); the same for every node without data of its own, so that nodes
    # sharing a process share one runtime
    cfg["node"] = {"device": True, "ledger": [str(state_dir), node.partition_id]}
    if node.data_path:
        cfg["node"].update(
            {
                "partition-id": node.partition_id,
                "data-path": str(Path(node.data_path).expanduser().resolve()),
                "bundle": str(Path(node.bundle).expanduser().resolve()),
            }
        )
    return cfg


@lru_cache(maxsize=4)
def _client_app(cfg_key: str) -> ClientApp:
    import torch

    from fedkd.client import build_client_app

    cfg = json.loads(cfg_key)
    # As a simulated client does: simulation.num_cpus torch threads (and the same sums)
    torch.set_num_threads(typed(cfg).simulation.num_cpus)
    return build_client_app(cfg)


def _delegate(cfg: dict[str, Any], message: Message, context: Context) -> Message:
    return _client_app(json.dumps(cfg, sort_keys=True))(message, context)


def admit_round(node: NodeSettings, cfg: dict[str, Any], message: Message, run_id: int) -> None:
    """Before any training: the plan within the node's policy, and its round admitted
    to the node's ledger (forward within the run, within max-epsilon); RunRefused."""
    from fedkd.comm.codecs import payload_bytes
    from fedkd.local_round import shard_size
    from fedkd.node_ledger import Entry, NodeLedger, dp_entry
    from fedkd.node_policy import BUDGET_DELTA
    from fedkd.privacy.dpsgd import DPSGD, dp_steps_per_round

    settings = typed(cfg)
    plan = RoundPlan.from_record(message.content.config_records[CONFIG])
    nbytes = sum(payload_bytes(r) for r in message.content.array_records.values())
    # first without the shard (its steps counted as one batch an epoch), so that a
    # plan refused anyway costs the device no data loading; then with it
    for shard in (0, None):
        if shard is None:
            shard = shard_size(cfg, node.partition_id, plan.task)
        broken = node.policy.plan_violations(plan, settings, shard, nbytes)
        if broken:
            raise RunRefused(
                f"this node's policy refuses round {plan.round}'s plan: " + "; ".join(broken)
            )
    entry = Entry(run=run_id, round=plan.round)
    pv = settings.privacy
    if pv.mode == "sample":
        dp = DPSGD.from_config(pv, plan.training)
        rate, steps = dp_steps_per_round(shard, dp.batch_size, dp.epochs)
        entry = dp_entry(run_id, plan.round, pv.noise_multiplier, rate, steps)
    delta = min(pv.delta, BUDGET_DELTA)
    NodeLedger(node.state_dir, node.partition_id).admit(entry, node.policy.max_epsilon, delta)


def guarded(handler: Callable[[Message, Context], Message]) -> Callable:
    """What leaves the device is the device's choice: a refusal says which keys are
    wrong (its details go to the node's log only); any other failure names only
    its type, never a path, a file's content or a value from the environment."""

    @functools.wraps(handler)
    def serve(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except (RunRefused, InvalidPlan) as exc:
            detail = getattr(exc, "local", str(exc))
            log.error("fedkd: %s%s", exc, "" if detail == str(exc) else f" ({detail})")
            raise RunRefused(str(exc)[:500]) from None
        except Exception as exc:
            log.exception(
                "fedkd: this node failed to serve a %s message", message.metadata.message_type
            )
            what = type(exc).__name__ if isinstance(exc, FedKDError | ValueError) else "error"
            raise RunRefused(
                f"this node could not serve the {message.metadata.message_type} message "
                f"({what}; the details are in the node's log)"
            ) from None

    return serve


client_app = ClientApp()


@client_app.query()
@guarded
def client_query(message: Message, context: Context) -> Message:
    node = NodeSettings.parse(dict(context.node_config))
    return _delegate(node_cfg(context, node), message, context)


@client_app.train()
@guarded
def client_train(message: Message, context: Context) -> Message:
    # the device's policy and ledger first: a plan outside them is refused before
    # any training
    node = NodeSettings.parse(dict(context.node_config))
    cfg = node_cfg(context, node)
    admit_round(node, cfg, message, context.run_id)
    return _delegate(cfg, message, context)

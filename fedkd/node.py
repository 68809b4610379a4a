"""A SuperNode's side of a run, before any message is served: its settings (the
owner's `--node-config`), the config it runs (fedkd/node_config.py: the run's
allowed settings under its owner's file), the run and each round's plan checked
against its policy (fedkd/node_policy.py) and admitted to its ledger
(fedkd/node_ledger.py), and `guarded`: what goes back to the server is the
device's choice, never what it read.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

from fedkd.config import typed
from fedkd.errors import ConfigError, FedKDError
from fedkd.node_config import RunRefused, compose_node_config
from fedkd.node_policy import NodePolicy
from fedkd.protocol import CONFIG, InvalidPlan, RoundPlan
from fedkd.resources import resolve_num_gpus

log = logging.getLogger("fedkd.app")

DEFAULT_STATE_DIR = "~/.cache/fedkd/client_state"


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
                    node signs its partition claim with it (fedkd/partition_keys.py)
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
    return _node_config(overrides, node.config, stamp)  # a non-string: run_overrides refuses


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
    # a device (fedkd.client_runtime: its store is fsynced, its DP spending is the
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


def admit_round(node: NodeSettings, cfg: dict[str, Any], message: Message, run_id: int) -> None:
    """Before any training: the plan within the node's policy, and its round admitted
    to the node's ledger (forward within the run, within max-epsilon); RunRefused."""
    from fedkd.client_runtime import shard_size
    from fedkd.comm.codecs import payload_bytes
    from fedkd.node_ledger import Entry, NodeLedger
    from fedkd.node_policy import BUDGET_DELTA
    from fedkd.privacy.dpsgd import DPSGD, dp_steps_per_round

    settings = typed(cfg)
    plan = RoundPlan.from_record(message.content.config_records[CONFIG])
    nbytes = sum(payload_bytes(r) for r in message.content.array_records.values())
    # first without the shard (its steps counted as one batch an epoch), so that a
    # plan refused anyway costs the device no data loading; then with it
    _refuse_plan(plan, node.policy.plan_violations(plan, settings, 0, nbytes))
    shard = shard_size(cfg, node.partition_id, plan.task)
    _refuse_plan(plan, node.policy.plan_violations(plan, settings, shard, nbytes))
    entry = Entry(run=run_id, round=plan.round)
    pv = settings.privacy
    if pv.mode == "sample":
        dp = DPSGD.from_config(pv, plan.training)
        rate, steps = dp_steps_per_round(shard, dp.batch_size, dp.epochs)
        entry = Entry(run_id, plan.round, q=rate, sigma=pv.noise_multiplier, steps=steps)
    delta = min(pv.delta, BUDGET_DELTA)
    NodeLedger(node.state_dir, node.partition_id).admit(entry, node.policy.max_epsilon, delta)


def _refuse_plan(plan: RoundPlan, broken: list[str]) -> None:
    if broken:
        raise RunRefused(
            f"this node's policy refuses round {plan.round}'s plan: " + "; ".join(broken)
        )


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

"""The Flower app behind `flwr run`: the simulation's ServerApp and ClientApp, with
their config composed from conf/ by the run config's `overrides`.

    flwr run . local --run-config 'overrides="strategy=fedmd rounds=5"'

The server composes its config from the `overrides` as `fedkd-sim` would. A
SuperNode answers to its owner: it takes from the run only the plain experiment
settings fedkd/node_config.py allows, under its owner's config file, checks the
run and every round's plan against its policy (fedkd/node_policy.py) and admits
each round to its ledger (fedkd/node_ledger.py) before any training, and sends
back no text it read on the device (fedkd/node.py). Results go to `out-dir` on the
server; run config `partition-keys` (the file `fedkd-deploy keys` writes) binds
each partition to its node's key (fedkd/partition_keys.py).
"""

from __future__ import annotations

import json
import logging
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
from fedkd.node import NodeSettings, admit_round, guarded, node_cfg
from fedkd.resources import resolve_num_gpus

log = logging.getLogger("fedkd.app")

DEFAULT_OUT_DIR = "outputs/flwr"
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
    from fedkd.atomic import write_text_atomic
    from fedkd.partition_keys import PartitionKeys
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


# a SuperNode's handlers: its settings, config, policy and ledger first (fedkd/node.py)
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

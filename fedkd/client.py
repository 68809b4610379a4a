"""The Flower ClientApp: the handshake and the round's work (fedkd/local_round.py)
wrapped in Flower messages, with the injected faults and the upload-clipping mod;
in simulation with cohorts (fedkd/cohort.py), one node serves a group of clients.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedkd import faults
from fedkd.client_runtime import client_runtime
from fedkd.cohort import COHORT, node_partitions, pack_replies, unpack_downloads
from fedkd.comm.codecs import recode
from fedkd.config import typed
from fedkd.local_round import client_reply, decoded
from fedkd.partition_keys import sign_claim
from fedkd.privacy.release import shard_size
from fedkd.privacy.upload import clip_reply, clip_upload_mod
from fedkd.protocol import CONFIG, INFO, METRICS, REPLY_LOGITS, WEIGHTS, RoundPlan

log = logging.getLogger("fedkd.client")


def partition_id_of(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise ValueError(
            "this node has no 'partition-id' in its node config "
            "(start the SuperNode with --node-config 'partition-id=0 num-partitions=N')"
        ) from None


def handle_query(plain: dict[str, Any], message: Message, context: Context) -> Message:
    """Handshake: tell the server which partition this node holds and which proxy set
    (a digest); fail here, once, if the node's data or settings are wrong."""
    pid = partition_id_of(context)
    num_clients = typed(plain).num_clients
    if not 0 <= pid < num_clients:
        raise ValueError(
            f"node config partition-id={pid} is outside 0..{num_clients - 1} "
            f"(the run has num_clients={num_clients})"
        )
    parts = context.node_config.get("num-partitions")
    if parts is not None and int(parts) != num_clients:
        raise ValueError(
            f"node config num-partitions={parts} but the run has num_clients={num_clients}"
        )
    runtime = client_runtime(plain)
    n = shard_size(runtime.cfg.privacy.mode, len(runtime.data.shards[pid]))
    info: dict[str, Any] = {"proxy-digest": runtime.data.proxy_digest}
    info.update(signed_claim(message, context, pid))
    content = RecordDict(
        {
            METRICS: MetricRecord({"partition-id": pid, "num-examples": n}),
            INFO: ConfigRecord(info),
        }
    )
    return Message(content, reply_to=message)


def signed_claim(message: Message, context: Context, pid: int) -> dict[str, Any]:
    """With node config `auth-key`: the node's public key and its signature of the
    server's nonce, the run id and `pid` (fedkd/partition_keys.py), so the server can
    check that this partition is this node's; nothing without a key or a nonce."""
    key = context.node_config.get("auth-key")
    config = message.content.config_records.get(CONFIG)
    nonce = None if config is None else config.get("nonce")
    if not key or not isinstance(nonce, bytes):
        return {}
    public, signature = sign_claim(str(key), nonce, context.run_id, pid)
    return {"public-key": public, "signature": signature}


def serve_client(
    plain: dict[str, Any], pid: int, download: RecordDict, memo: dict | None = None
) -> RecordDict:
    """One client's round with its injected faults, whichever path carried it;
    `memo` shares decoded broadcast records between the clients of one cohort."""
    memo = {} if memo is None else memo
    plan = decoded(memo, download.config_records[CONFIG], RoundPlan.from_record)
    runtime = client_runtime(plain)
    faults.before_round(runtime.cfg, plan.round, pid)  # an injected crash or stall, if any
    content = client_reply(plain, pid, download, memo)
    shape = (plan.proxy_count, runtime.data.num_classes)
    logits = plan.reply == REPLY_LOGITS  # adversaries rewrite soft labels only
    faults.after_round(
        runtime.cfg,
        plan.round,
        pid,
        content,
        runtime.algorithm.reply_record or WEIGHTS,
        (lambda rec, fn: recode(rec, plan.codec, shape, fn)) if logits else None,
    )
    return content


def handle_train(plain: dict[str, Any], message: Message, context: Context) -> Message:
    return Message(serve_client(plain, partition_id_of(context), message.content), reply_to=message)


# ---------------------------------------------------------------------------- cohorts
def cohort_of(plain: dict[str, Any], context: Context) -> list[int]:
    """The partitions this simulated node serves (fedkd/cohort.py)."""
    cfg = client_runtime(plain).cfg  # typed once per worker, not once per message
    nodes = cfg.simulation.cohort_nodes or 0
    declared = int(context.node_config.get("num-partitions", nodes))
    if declared != nodes:
        raise ValueError(f"{declared} simulated nodes, but simulation.cohort_nodes={nodes}")
    return node_partitions(partition_id_of(context), nodes, cfg.num_clients)


def handle_cohort_query(plain: dict[str, Any], message: Message, context: Context) -> Message:
    """The cohort handshake: every partition this node serves and its shard size."""
    pids = cohort_of(plain, context)
    runtime = client_runtime(plain)
    mode = runtime.cfg.privacy.mode
    sizes = [shard_size(mode, len(runtime.data.shards[pid])) for pid in pids]
    content = RecordDict(
        {
            METRICS: MetricRecord({"partition-ids": pids, "num-examples": sizes}),
            INFO: ConfigRecord({"proxy-digest": runtime.data.proxy_digest}),
        }
    )
    return Message(content, reply_to=message)


def handle_cohort_train(plain: dict[str, Any], message: Message, context: Context) -> Message:
    """Every client of the node's message, one after the other; a client's error
    is its own reply, the others still answer."""
    owned = set(cohort_of(plain, context))
    privacy = client_runtime(plain).cfg.privacy
    memo: dict = {}
    results: list[tuple[int, RecordDict | str]] = []
    for pid, download in unpack_downloads(message.content):
        try:
            if pid not in owned:
                raise ValueError(f"partition {pid} is not served by this node")
            content = serve_client(plain, pid, download, memo)
            if privacy.mode == "client":  # what the per-client path's mod does
                plan = decoded(memo, download.config_records[CONFIG], RoundPlan.from_record)
                classes = client_runtime(plain).data.num_classes
                clip_reply(plan, content, privacy.clip_norm, classes)
            results.append((pid, content))
        except Exception as exc:  # this client fails; its cohort does not
            results.append((pid, f"{type(exc).__name__}: {exc}"))
    return Message(pack_replies(results), reply_to=message)


def build_client_app(plain: dict[str, Any]) -> ClientApp:
    """A ClientApp bound to a resolved config (a plain dict, cheap to pickle to Ray):
    a node per client, or with `simulation.execution=cohort` a node per cohort."""
    app = ClientApp()
    privacy = typed(plain).privacy
    if plain["simulation"].get("execution") == COHORT:

        @app.query()
        def cohort_query(message: Message, context: Context) -> Message:
            return handle_cohort_query(plain, message, context)

        @app.train()
        def cohort_train(message: Message, context: Context) -> Message:
            return handle_cohort_train(plain, message, context)

        return app

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return handle_query(plain, message, context)

    mods = []
    if privacy.mode == "client":  # clip the upload before it leaves the client
        classes = lambda: client_runtime(plain).data.num_classes  # noqa: E731 (on the worker)
        mods.append(clip_upload_mod(privacy.clip_norm, classes))

    @app.train(mods=mods)
    def train(message: Message, context: Context) -> Message:
        return handle_train(plain, message, context)

    return app

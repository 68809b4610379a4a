"""The Flower ClientApp: local training plus distillation, and the reply.

One round on a client (DESIGN.md, "One round"): load its shard (cached per worker
process), its persisted student and the teacher's soft labels on the round's proxy
subset; train CE on private data + KD on the proxy subset; reply with its logits on
that subset (or its weights, for weight-sharing strategies) and its metrics.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedkd import faults
from fedkd.client_store import ClientStore
from fedkd.comm.codecs import check, decode, encode, recode
from fedkd.data.device import device_federated_data
from fedkd.data.federated import FederatedData, federated_data
from fedkd.mitigations import ClientRound, build_mitigation
from fedkd.models import create_model
from fedkd.privacy import gaussian_epsilon
from fedkd.privacy.dpsgd import DPSGD, dp_steps_per_round, dp_train_student
from fedkd.privacy.upload import clip_upload_mod
from fedkd.protocol import (
    CONFIG,
    INFO,
    KNOWLEDGE,
    LOGITS,
    METRICS,
    REPLY_LOGITS,
    REPLY_WEIGHTS,
    ROLE_REVIEW,
    SOFT_LABELS,
    TEACHER,
    WEIGHTS,
    InvalidReply,
    RoundPlan,
)
from fedkd.resources import client_device, in_ray_worker
from fedkd.seeding import torch_generator
from fedkd.training import (
    LocalTraining,
    accuracy,
    distill_to_targets,
    predict_logits,
    train_student,
)

log = logging.getLogger("fedkd.client")


def student_name(cfg: dict, partition_id: int) -> str:
    """Heterogeneous students: client i gets model.students[i % len], else model.student."""
    students = cfg["model"]["students"]
    return students[partition_id % len(students)] if students else cfg["model"]["student"]


def new_student(cfg: dict, data: FederatedData, partition_id: int) -> nn.Module:
    return create_model(
        student_name(cfg, partition_id),
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        seed=(cfg["seed"], partition_id, "student-init"),
        **cfg["model"]["student_kwargs"],
    )


@dataclass
class ClientRuntime:
    """What a worker process loads once and reuses for every client it serves."""

    cfg: dict
    data: FederatedData
    store: ClientStore
    device: str


@lru_cache(maxsize=2)
def _runtime(cfg_key: str) -> ClientRuntime:
    cfg = json.loads(cfg_key)
    sim = cfg["simulation"]
    if in_ray_worker():
        torch.set_num_threads(int(sim["num_cpus"]))
    store_dir = sim["client_state_dir"] or str(Path.cwd() / "client_state")
    node = cfg.get("node") or {}  # set by fedkd.app on a SuperNode with its own data
    if node.get("data-path"):
        data = device_federated_data(cfg, node["partition-id"], node["data-path"], node["bundle"])
    else:
        data = federated_data(cfg)
    return ClientRuntime(
        cfg=cfg,
        data=data,
        store=ClientStore(store_dir),
        device=client_device(float(sim["num_gpus"])),
    )


def client_runtime(cfg: dict) -> ClientRuntime:
    """This process's runtime for `cfg`, built on the first call of any client."""
    return _runtime(json.dumps(cfg, sort_keys=True))


def partition_id_of(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise ValueError(
            "this node has no 'partition-id' in its node config "
            "(start the SuperNode with --node-config 'partition-id=0 num-partitions=N')"
        ) from None


def handle_query(cfg: dict, message: Message, context: Context) -> Message:
    """Handshake: tell the server which partition this node holds and which proxy set
    (a digest); fail here, once, if the node's data or settings are wrong."""
    pid = partition_id_of(context)
    if not 0 <= pid < int(cfg["num_clients"]):
        raise ValueError(
            f"node config partition-id={pid} is outside 0..{int(cfg['num_clients']) - 1} "
            f"(the run has num_clients={cfg['num_clients']})"
        )
    parts = context.node_config.get("num-partitions")
    if parts is not None and int(parts) != int(cfg["num_clients"]):
        raise ValueError(
            f"node config num-partitions={parts} but the run has num_clients={cfg['num_clients']}"
        )
    runtime = client_runtime(cfg)
    n = len(runtime.data.shards[pid])
    content = RecordDict(
        {
            METRICS: MetricRecord({"partition-id": pid, "num-examples": n}),
            INFO: ConfigRecord({"proxy-digest": runtime.data.proxy_digest}),
        }
    )
    return Message(content, reply_to=message)


def evaluate_tasks(model: nn.Module, data: FederatedData, device: str) -> list[float]:
    """A student's accuracy on every task's (client) test data."""
    return [accuracy(model, x, y, device=device) for x, y in data.client_task_tests]


def client_reply(cfg: dict, pid: int, download: RecordDict) -> RecordDict:
    """One client's round: the server's download in, the client's upload out.

    The ClientApp wraps this in Flower messages; `fedkd-bench` calls it directly to
    measure the same work without the simulation engine.
    """
    started = time.perf_counter()
    runtime = client_runtime(cfg)
    data = runtime.data
    plan = RoundPlan.from_record(download.config_records[CONFIG])
    arrays = download.array_records

    state = runtime.store.load(pid, before_round=plan.round) or {}
    student = new_student(cfg, data, pid)
    metrics: dict = {}
    if "model" in state:
        student.load_state_dict(state["model"])
    elif data.stream.lifelong:
        metrics["initial-task-accuracy"] = evaluate_tasks(student, data, runtime.device)  # b_j
    if WEIGHTS in arrays:
        student.load_state_dict(arrays[WEIGHTS].to_torch_state_dict())

    proxy_x = data.proxy_inputs(list(plan.proxy))
    kd_x, teacher_probs = proxy_x, None  # the student distills on kd_x
    if TEACHER in arrays:
        rows = plan.teacher_rows(len(proxy_x))
        if len(rows) < len(proxy_x):
            kd_x = proxy_x[torch.from_numpy(rows)]
        shape = (len(kd_x), data.num_classes)
        try:
            check(arrays[TEACHER], plan.teacher_codec, SOFT_LABELS, shape)
        except InvalidReply as exc:
            raise ValueError(f"malformed teacher soft labels from the server: {exc}") from None
        teacher_probs = decode(arrays[TEACHER], SOFT_LABELS, plan.teacher_codec, shape, "probs")

    hp = LocalTraining(
        epochs=plan.epochs,
        batch_size=plan.batch_size,
        lr=plan.lr,
        momentum=plan.momentum,
        weight_decay=plan.weight_decay,
        alpha=plan.alpha,
        temperature=plan.temperature,
    )
    gen = torch_generator(cfg["seed"], plan.round, pid, "local-train")
    x, y = data.client_data(pid, plan.task)
    previous = state.get("task")
    if plan.role == ROLE_REVIEW and teacher_probs is not None:
        # review: distill what the federation knew, on public data only
        opt = torch.optim.SGD(student.parameters(), lr=hp.lr, momentum=hp.momentum)
        loss = distill_to_targets(
            student,
            kd_x,
            teacher_probs,
            temperature=hp.temperature,
            epochs=hp.epochs,
            lr=hp.lr,
            batch_size=hp.batch_size,
            generator=gen,
            device=runtime.device,
            optimizer=opt,
        )
    else:
        mitigation = build_mitigation(cfg)
        extras = mitigation.client_extras(
            ClientRound(
                data,
                pid,
                plan,
                student,
                state,
                previous is not None and previous != plan.task,
                previous,
                x,
                y,
                runtime.device,
            )
        )
        metrics.update(extras.info)
        if cfg["privacy"]["mode"] == "sample":
            loss = train_private(
                cfg, student, extras.x, extras.y, hp, gen, state, kd_x, teacher_probs, runtime
            )
        else:
            loss = train_student(
                student,
                extras.x,
                extras.y,
                hp,
                gen,
                proxy_x=kd_x,
                teacher_probs=teacher_probs,
                device=runtime.device,
                private_probs=extras.private_probs,
                private_weight=extras.private_weight,
            )
        state["task"] = plan.task

    if cfg["privacy"]["mode"] == "sample":
        metrics["dp-epsilon"] = private_epsilon(cfg, state)
    task_acc = evaluate_tasks(student, data, runtime.device)
    metrics.update(
        {
            "num-examples": len(y),
            "train-loss": float(loss),
            "test-accuracy": float(sum(task_acc) / len(task_acc)),
        }
    )
    if data.stream.lifelong:
        metrics["task-accuracy"] = task_acc
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if plan.reply == REPLY_LOGITS:
        logits = predict_logits(student, proxy_x, device=runtime.device)
        content[KNOWLEDGE] = encode(logits, plan.codec, LOGITS, kind="logits")
    elif plan.reply == REPLY_WEIGHTS:
        content[WEIGHTS] = ArrayRecord(student.cpu().state_dict())
    state["model"] = student.cpu().state_dict()
    runtime.store.save(pid, state, plan.round)
    content[METRICS]["compute-seconds"] = time.perf_counter() - started
    content[INFO] = ConfigRecord(worker_info())
    return content


def train_private(
    cfg: dict,
    student: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    hp: LocalTraining,
    gen: torch.Generator,
    state: dict,
    proxy_x: torch.Tensor,
    teacher_probs: torch.Tensor | None,
    runtime: ClientRuntime,
) -> float:
    """DP-SGD on the private data (privacy.mode=sample); the DP steps taken are added
    to the client's accounting history, kept with its state as {sample rate: steps}."""
    pv = cfg["privacy"]
    dp = DPSGD(float(pv["noise_multiplier"]), float(pv["max_grad_norm"]))
    loss, steps = dp_train_student(
        student, x, y, hp, dp, gen, proxy_x, teacher_probs, device=runtime.device
    )
    rate, _ = dp_steps_per_round(len(y), hp.batch_size, hp.epochs)
    history = state.setdefault("dp-history", {})
    key = repr(float(rate))
    history[key] = history.get(key, 0) + steps
    return loss


def private_epsilon(cfg: dict, state: dict) -> float:
    """This client's epsilon so far, over every DP-SGD step it has taken."""
    pv = cfg["privacy"]
    events = [(float(q), n) for q, n in state.get("dp-history", {}).items()]
    return gaussian_epsilon(float(pv["noise_multiplier"]), events, float(pv["delta"]))


def worker_info() -> dict[str, str]:
    """Where this client ran: the host and, in simulation, the Ray node."""
    info = {"host": socket.gethostname(), "ray-node": ""}
    if in_ray_worker():
        import ray

        info["ray-node"] = ray.get_runtime_context().get_node_id()
    return info


def handle_train(cfg: dict, message: Message, context: Context) -> Message:
    pid = partition_id_of(context)
    plan = RoundPlan.from_record(message.content.config_records[CONFIG])
    faults.before_round(cfg, plan.round, pid)  # an injected crash or stall, if any
    content = client_reply(cfg, pid, message.content)
    shape = (plan.proxy_count, client_runtime(cfg).data.num_classes)
    logits = plan.reply == REPLY_LOGITS
    faults.after_round(
        cfg,
        plan.round,
        pid,
        content,
        KNOWLEDGE if logits else WEIGHTS,
        (lambda rec, fn: recode(rec, plan.codec, shape, fn)) if logits else None,
    )
    return Message(content, reply_to=message)


def build_client_app(cfg: dict) -> ClientApp:
    """A ClientApp bound to a resolved config (a plain dict, cheap to pickle to Ray)."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return handle_query(cfg, message, context)

    pv = cfg["privacy"]
    mods = []
    if pv["mode"] == "client":  # clip the upload before it leaves the client
        classes = lambda: client_runtime(cfg).data.num_classes  # noqa: E731 (on the worker)
        mods.append(clip_upload_mod(float(pv["clip_norm"]), classes))

    @app.train(mods=mods)
    def train(message: Message, context: Context) -> Message:
        return handle_train(cfg, message, context)

    return app

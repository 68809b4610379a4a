"""One client's round, without Flower: the server's download in, the upload out.

    load the student          (client store, or a fresh seeded one; FedAvg: weights)
    read the teacher's labels (checked against the plan's codec and shape)
    train                     (the mitigation may extend or replace it; DP-SGD if set)
    evaluate and reply        (logits on the proxy subset, or weights; metrics)

The ClientApp (fedkd/client.py) wraps `client_reply` in Flower messages;
`fedkd-bench` calls it directly to measure the same work without the engine.
See docs/design.md, "One round, as data flows".
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from fedkd.client_runtime import ClientRuntime, client_runtime
from fedkd.comm.codecs import check, decode
from fedkd.config import FedKDConfig, typed
from fedkd.data.federated import FederatedData
from fedkd.loss_terms import LossTerm, SoftTargets
from fedkd.mitigations import ClientExtras, ClientRound
from fedkd.models import create_model, with_activation
from fedkd.node_ledger import Entry, NodeLedger, simulation_ledger_file
from fedkd.privacy.dpsgd import DPSGD, dp_steps_per_round, dp_train_student
from fedkd.privacy.noise import DPNoise
from fedkd.privacy.release import releasable
from fedkd.protocol import (
    CONFIG,
    INFO,
    METRICS,
    SOFT_LABELS,
    TEACHER,
    WEIGHTS,
    InvalidReply,
    RoundPlan,
)
from fedkd.seeding import torch_generator
from fedkd.training import accuracy, on_device, train_student


def new_student(cfg: FedKDConfig | dict, data: FederatedData, partition_id: int) -> nn.Module:
    cfg = cfg if isinstance(cfg, FedKDConfig) else typed(cfg)
    model = create_model(
        cfg.model.student_of(partition_id),
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        seed=(cfg.seed, partition_id, "student-init"),
        **cfg.model.student_kwargs,
    )
    return with_activation(model, cfg.privacy.activation)


def evaluate_tasks(model: nn.Module, data: FederatedData, device: str) -> list[float]:
    """A student's accuracy on every task's (client) test data."""
    return [accuracy(model, x, y, device=device) for x, y in data.client_task_tests]


def teacher_labels(
    plan: RoundPlan,
    arrays: dict[str, ArrayRecord],
    data: FederatedData,
    proxy_x: torch.Tensor,
    memo: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The proxy items the teacher's soft labels cover, and the labels (None: none sent).

    The items are the round's own (`proxy_x`), or those `plan.teacher_proxy` names."""
    if TEACHER not in arrays:
        return proxy_x, None
    if plan.teacher_proxy:
        proxy_x = data.proxy_inputs(list(plan.teacher_proxy))
    rows = plan.teacher_rows(len(proxy_x))
    kd_x = proxy_x[torch.from_numpy(rows)] if len(rows) < len(proxy_x) else proxy_x
    shape = (len(kd_x), data.num_classes)
    return kd_x, decoded(
        {} if memo is None else memo, arrays[TEACHER], _teacher_probs, plan.teacher_codec, shape
    )


def _teacher_probs(record: ArrayRecord, codec: str, shape: tuple[int, int]) -> torch.Tensor:
    try:
        check(record, codec, SOFT_LABELS, shape)
    except InvalidReply as exc:
        raise ValueError(f"malformed teacher soft labels from the server: {exc}") from None
    return decode(record, SOFT_LABELS, codec, shape, "probs")


def train_round(runtime: ClientRuntime, ctx: ClientRound) -> tuple[float, dict[str, float]]:
    """Local training as the mitigation and the privacy mode say; (loss, metrics).
    The loss is CE plus the strategy's client terms and the mitigation's."""
    loss = runtime.mitigation.client_train(ctx)
    if loss is not None:
        return loss, {}
    if ctx.training.schedule == "sequential" and ctx.teacher_probs is not None:
        hp = ctx.training  # FedMD's "digest": KD epochs on the proxy, then CE below
        ctx.distill_on_proxy(hp.kd_epochs, hp.kd_lr, hp.kd_batch_size)
        ctx = replace(ctx, teacher_probs=None)
    extras = runtime.mitigation.client_extras(ctx)
    if runtime.cfg.privacy.mode == "sample":
        loss = train_private(runtime, ctx, extras.x, extras.y)
    else:
        terms = [*runtime.algorithm.terms(ctx), *mitigation_terms(extras)]
        hp, gen = ctx.training, ctx.generator
        loss = train_student(ctx.student, extras.x, extras.y, hp, gen, terms, runtime.device)
    ctx.state["task"] = ctx.plan.task
    return loss, extras.info


def mitigation_terms(extras: ClientExtras) -> list[LossTerm]:
    """The loss terms a mitigation's extras add (rehearsal, LwF), those that count."""
    terms: list[LossTerm] = []
    if extras.rehearsal is not None and extras.rehearsal.weight > 0:
        terms.append(extras.rehearsal)
    if extras.private_probs is not None and extras.private_weight > 0:
        terms.append(SoftTargets(extras.private_probs, extras.private_weight))
    return terms


def starting_student(
    runtime: ClientRuntime, pid: int, state: dict[str, Any], weights: dict | None
) -> tuple[nn.Module, bool]:
    """The model the client starts its round from, and whether it is new (first round).

    Its own saved student, or the broadcast `weights` (loaded by the caller), or a
    seeded new one. Building a model with its seeded initialisation costs
    milliseconds, so a client whose weights come from elsewhere reuses a blank module
    of the architecture instead (`ClientRuntime.blank`): the numbers are the same, the
    cost is a copy."""
    cfg, data = runtime.cfg, runtime.data
    new = "model" not in state  # every round saves the student
    initial_weights_used = new and (weights is None or data.stream.lifelong)
    # DP-SGD wraps the model in Opacus' hooks: a fresh module each round, always
    if initial_weights_used or cfg.privacy.mode == "sample":
        student = new_student(cfg, data, pid)
    else:
        student = runtime.blank(cfg.model.student_of(pid), lambda: new_student(cfg, data, pid))
    if "model" in state and weights is None:  # broadcast weights replace it anyway
        student.load_state_dict(state["model"])
    return student, new


def client_reply(
    plain: dict[str, Any], pid: int, download: RecordDict, memo: dict | None = None
) -> RecordDict:
    """One client's round: the server's download in, the client's upload out.
    `memo` (a cohort's clients share it) keeps decoded broadcast records."""
    started = time.perf_counter()
    runtime = client_runtime(plain)
    memo = {} if memo is None else memo
    plan = decoded(memo, download.config_records[CONFIG], RoundPlan.from_record)
    half = runtime.algorithm
    if plan.reply != half.reply_kind:  # the configured strategy's client answers
        raise ValueError(
            f"the plan asks for reply={plan.reply!r}; this strategy replies {half.reply_kind!r}"
        )
    ctx, metrics, proxy_x = round_context(runtime, pid, plan, download.array_records, memo)
    loss, info = train_round(runtime, ctx)
    metrics.update(info)
    if runtime.cfg.privacy.mode == "sample":
        metrics["dp-epsilon"] = private_epsilon(runtime, pid)
        metrics["dp-secure-noise"] = int(runtime.cfg.privacy.secure_noise)
    metrics.update(evaluated(runtime, ctx, loss))
    content = RecordDict()
    if half.reply_record is not None:
        content[half.reply_record] = half.upload(ctx, proxy_x)
    # kept even when the next broadcast replaces it: fedkd-export and fedkd-audit
    # read a client's latest student (the weights the server saw)
    ctx.state["model"] = on_device(ctx.student, "cpu").state_dict()
    runtime.store.save(pid, ctx.state, plan.round)
    metrics["compute-seconds"] = time.perf_counter() - started
    # under DP, only what the accountant covers leaves the client (fedkd/privacy/release.py)
    content[METRICS] = MetricRecord(releasable(runtime.cfg.privacy.mode, metrics))
    content[INFO] = ConfigRecord(runtime.info)
    return content


def round_context(
    runtime: ClientRuntime, pid: int, plan: RoundPlan, arrays: dict[str, ArrayRecord], memo: dict
) -> tuple[ClientRound, dict[str, Any], torch.Tensor]:
    """The client's round as its hooks see it (student loaded, teacher labels read),
    the metrics known before training, and the round's proxy items."""
    cfg, data = runtime.cfg, runtime.data
    state = runtime.store.load(pid, before_round=plan.round) or {}
    weights = (
        decoded(memo, arrays[WEIGHTS], ArrayRecord.to_torch_state_dict)
        if WEIGHTS in arrays
        else None
    )
    student, new = starting_student(runtime, pid, state, weights)
    metrics: dict[str, Any] = {}
    if new and data.stream.lifelong:
        metrics["initial-task-accuracy"] = evaluate_tasks(student, data, runtime.device)  # b_j
    if weights is not None:
        student.load_state_dict(weights)
    proxy_x = data.proxy_inputs(list(plan.proxy))
    kd_x, teacher_probs = teacher_labels(plan, arrays, data, proxy_x, memo)
    x, y = data.client_data(pid, plan.task)
    previous = state.get("task")
    ctx = ClientRound(
        data=data,
        partition_id=pid,
        plan=plan,
        student=student,
        state=state,
        new_task=previous is not None and previous != plan.task,
        previous_task=previous,
        x=x,
        y=y,
        device=runtime.device,
        kd_x=kd_x,
        teacher_probs=teacher_probs,
        generator=torch_generator(cfg.seed, plan.round, pid, "local-train"),
        arrays=arrays,
    )
    return ctx, metrics, proxy_x


def evaluated(runtime: ClientRuntime, ctx: ClientRound, loss: float) -> dict[str, Any]:
    """The metrics every reply carries after training."""
    task_acc = evaluate_tasks(ctx.student, runtime.data, runtime.device)
    metrics = {
        "round": ctx.plan.round,  # the server refuses a reply meant for another round
        "num-examples": len(ctx.y),
        "train-loss": float(loss),
        "test-accuracy": float(sum(task_acc) / len(task_acc)),
    }
    if runtime.data.stream.lifelong:
        metrics["task-accuracy"] = task_acc
    return metrics


def decoded(memo: dict, record: Any, decode_fn: Any, *key: Any) -> Any:
    """`decode_fn(record, *key)`, once per record object in a memo (a cohort's clients
    get the same broadcast record; the memo holds it, so its id stays its own)."""
    slot = (id(record), decode_fn, *key)
    if slot not in memo:
        memo[slot] = (record, decode_fn(record, *key))
    return memo[slot][1]


def train_private(
    runtime: ClientRuntime, ctx: ClientRound, x: torch.Tensor, y: torch.Tensor
) -> float:
    """DP-SGD on the private data (privacy.mode=sample); the DP steps taken are added
    to its ledger before it trains (a device's node did that already)."""
    pv, hp = runtime.cfg.privacy, ctx.training
    dp = DPSGD.from_config(pv, hp)
    rate, steps = dp_steps_per_round(len(y), dp.batch_size, dp.epochs)
    if runtime.ledger is None:  # simulated: written before training, retries and replays too
        entry = Entry(0, ctx.plan.round, rate, dp.noise_multiplier, steps)
        simulation_ledger(runtime, ctx.partition_id).record(entry)
    noise = DPNoise(None if pv.secure_noise else ctx.generator)  # secret unless asked not to be
    loss, _ = dp_train_student(
        ctx.student,
        x,
        y,
        hp,
        dp,
        ctx.generator,
        ctx.kd_x,
        ctx.teacher_probs,
        device=runtime.device,
        noise=noise,
    )
    return loss


def simulation_ledger(runtime: ClientRuntime, pid: int) -> NodeLedger:
    """A simulated client's append-only DP ledger, in the run's client store."""
    return NodeLedger(runtime.store.root, pid, simulation_ledger_file(pid))


def private_epsilon(runtime: ClientRuntime, pid: int) -> float:
    """This client's epsilon so far, over every DP-SGD step its ledger holds: a
    device's over all runs (fedkd/node_ledger.py), a simulated client's over this run,
    each round as often as it was trained."""
    delta = runtime.cfg.privacy.delta
    if runtime.ledger is not None:
        return NodeLedger(*runtime.ledger).epsilon(delta)  # [state-dir, partition]
    return simulation_ledger(runtime, pid).epsilon(delta)

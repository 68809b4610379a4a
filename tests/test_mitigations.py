"""Mitigations against forgetting: server hooks and client hooks, without Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict

from fedkd.client import build_client_app
from fedkd.client_runtime import client_runtime
from fedkd.comm.codecs import encode, payload_bytes
from fedkd.comm.npy import array_from_numpy
from fedkd.compose import validate
from fedkd.errors import ConfigError
from fedkd.inversion import Inversion, invert, soft_targets
from fedkd.local_round import new_student
from fedkd.mitigations.student_memory import MEMORY_INPUTS
from fedkd.protocol import (
    CONFIG,
    MEMORY,
    METRICS,
    ROLE_REVIEW,
    SOFT_LABELS,
    TEACHER,
    TRAIN,
    ProxySegment,
    RoundPlan,
)
from fedkd.round_loop import begin_round, prepare_round
from fedkd.training import LocalTraining
from tests.server_harness import logits_round, plans_of, server_state

LIFELONG = (
    "lifelong=class_incremental",
    "lifelong.num_tasks=2",
    "lifelong.rounds_per_task=1",
    "partition=iid",
)


def lifelong_state(plain_cfg, *overrides):
    return server_state(plain_cfg, *LIFELONG, *overrides)


def test_teacher_memory_remembers_and_weighs_the_memory(plain_cfg):
    state = lifelong_state(
        plain_cfg,
        "mitigation=teacher_memory",
        "mitigation.memory_weight=0.3",
        "mitigation.memory_size=25",
    )
    mitigation = state.mitigation
    logits_round(state, 1)
    mitigation.on_task_end(0)
    ((seg, probs),) = mitigation.memory
    assert seg.task == 0 and seg.count == 25 and probs.shape == (25, 10)
    assert torch.allclose(probs.sum(1), torch.ones(25), atol=1e-5)
    r = begin_round(state, 2)
    x = r.proxy_x
    target = torch.full((len(x), 10), 0.1)
    bx, bt, w = mitigation.teacher_batch(x, target)
    assert len(bx) == len(x) + 25 and torch.equal(bt[len(x) :], probs)
    assert float(w[: len(x)].sum()) == pytest.approx(0.7) and float(
        w[len(x) :].sum()
    ) == pytest.approx(0.3)


def test_drifting_proxy_uses_the_current_task_pool(plain_cfg):
    state = lifelong_state(plain_cfg, "lifelong.proxy=drifting")
    r = begin_round(state, 2)
    (seg,) = r.segments
    assert seg.task == 1
    rows, _ = state.data.proxy_items(r.segments)
    assert set(state.data.proxy_y[rows].tolist()) <= set(state.data.stream.task_classes[1])


def test_review_sends_old_knowledge_to_a_fraction_of_clients(plain_cfg):
    state = lifelong_state(
        plain_cfg,
        "strategy=fedmd",
        "mitigation=review",
        "mitigation.review_fraction=0.34",
    )
    _, downloads, _ = logits_round(state, 1)
    assert all(p.role == "learn" for p in plans_of(downloads))
    state.mitigation.on_task_end(0)
    with torch.no_grad():  # the teacher moves on; the review labels must not
        for p in state.strategy.teacher.parameters():
            p.add_(0.5)
    _, downloads = prepare_round(state, 2)
    plans = plans_of(downloads)
    reviewers = [i for i, p in enumerate(plans) if p.role == ROLE_REVIEW]
    assert len(reviewers) == 1 and plans[reviewers[0]].training.alpha == 0.0
    review = downloads[reviewers[0]][1].array_records[TEACHER]["soft-labels"].numpy()
    learner = downloads[(reviewers[0] + 1) % 3][1].array_records[TEACHER]["soft-labels"].numpy()
    assert review.shape == learner.shape and not np.array_equal(review, learner)


def context(pid):
    return Context(
        run_id=1,
        node_id=10 + pid,
        node_config={"partition-id": pid},
        state=RecordDict(),
        run_config={},
    )


# a client's local update in these tests (momentum and KD as a learner's)
LEARN = LocalTraining(
    epochs=1, batch_size=16, lr=0.05, momentum=0.9, weight_decay=0.0, alpha=0.9, temperature=3.0
)
# the rehearsal tests: more steps, no momentum, KD at T = 1
REHEARSE = LocalTraining(epochs=2, batch_size=16, lr=0.05, momentum=0.0, alpha=0.9, temperature=1.0)


def train_with(app, pid, rnd, task, arrays=None, memory=(), training=LEARN):
    """A client's round at `task` with a download of `arrays` (and plan.memory)."""
    plan = RoundPlan(
        round=rnd,
        task=task,
        role="learn",
        reply="logits",
        proxy=(ProxySegment(task, 3, 30),),
        codec="float16",
        training=training,
        memory=memory,
    )
    content = RecordDict({CONFIG: plan.to_record(), **(arrays or {})})
    msg = Message(content, dst_node_id=10 + pid, message_type=TRAIN)
    return app(msg, context(pid))


def test_client_lwf_freezes_the_previous_student_at_a_task_switch(plain_cfg):
    cfg = plain_cfg(*LIFELONG, "mitigation=client_lwf")
    app = build_client_app(cfg)
    store = client_runtime(cfg).store
    first = train_with(app, 0, 1, 0)
    assert "initial-task-accuracy" in first.content.metric_records[METRICS]
    after_task0 = store.load(0)["model"]
    assert "prev_model" not in store.load(0)
    train_with(app, 0, 2, 1)
    state = store.load(0)
    assert all(torch.equal(state["prev_model"][k], v) for k, v in after_task0.items())
    assert state["task"] == 1


def test_replay_keeps_exemplars_of_the_task_left_behind(plain_cfg):
    cfg = plain_cfg(*LIFELONG, "mitigation=replay", "mitigation.replay_size=7")
    app = build_client_app(cfg)
    store = client_runtime(cfg).store
    train_with(app, 1, 1, 0)
    reply = train_with(app, 1, 2, 1)
    assert reply.content.metric_records[METRICS]["replay-samples"] == 7
    rows = store.load(1)["replay"]["0"].numpy()
    assert set(rows.tolist()) <= set(client_runtime(cfg).data.task_shards[0][1].tolist())
    metrics = reply.content.metric_records[METRICS]
    assert len(metrics["task-accuracy"]) == 2


@pytest.mark.parametrize(
    "overrides",
    [
        ("strategy=local", "mitigation=teacher_memory"),
        ("strategy=local", "mitigation=review"),
        ("strategy=central", "mitigation=replay"),
        ("strategy=central", "mitigation=client_lwf"),
        ("strategy=central", "mitigation=student_memory"),
        ("strategy=local", "mitigation=student_memory"),
        ("privacy=sample", "mitigation=student_memory"),
    ],
)
def test_mitigations_that_do_not_fit_a_strategy_are_refused(tiny_cfg, overrides):
    with pytest.raises(ConfigError) as info:
        validate(tiny_cfg(*LIFELONG, *overrides))
    assert info.value.key == "mitigation"


# ------------------------------------------------------------- student_memory
STUDENT_MEMORY = ("mitigation=student_memory", "mitigation.student_items=12")


def test_student_memory_broadcasts_the_teachers_labels_on_past_items(plain_cfg):
    state = lifelong_state(
        plain_cfg, "strategy=fedmd", *STUDENT_MEMORY, "mitigation.source=broadcast"
    )
    _, downloads, _ = logits_round(state, 1)
    assert all(p.memory == () for p in plans_of(downloads))  # nothing to remember yet
    assert all(MEMORY not in content.array_records for _, content in downloads)
    state.mitigation.on_task_end(0)
    r, downloads = prepare_round(state, 2)
    plans = plans_of(downloads)
    ((seg,),) = {p.memory for p in plans}
    assert seg.task == 0 and seg.count == 12 and plans[0].task == 1
    records = [content.array_records[MEMORY] for _, content in downloads]
    assert all(rec is records[0] for rec in records)  # computed once for the round
    x = state.data.proxy_inputs([seg])
    teacher = state.strategy.server_model.eval()
    with torch.no_grad():  # the teacher's own soft labels, at distill.temperature (3)
        expected = torch.softmax(teacher(x) / 3.0, dim=1)
    got = torch.from_numpy(records[0][SOFT_LABELS].numpy().astype(np.float32))
    assert got.shape == (12, 10) and torch.allclose(got, expected, atol=2e-3)
    own = sum(payload_bytes(rec) for k, rec in downloads[0][1].array_records.items())
    assert r.bytes_down == len(downloads) * own  # the memory is counted as sent
    assert payload_bytes(records[0]) >= 12 * 10 * 2  # float16 labels


def test_student_memory_client_rehearses_the_broadcast_labels(plain_cfg):
    cfg = plain_cfg(
        *LIFELONG, *STUDENT_MEMORY, "mitigation.source=broadcast", "mitigation.student_weight=2"
    )
    app = build_client_app(cfg)
    data = client_runtime(cfg).data
    seg = ProxySegment(0, 11, 12)
    x = data.proxy_inputs([seg])
    target = torch.zeros(12, 10)
    target[:, 7] = 1.0  # every remembered item "is" class 7
    labels = {MEMORY: encode(target, "float16", SOFT_LABELS, kind="probs")}
    reply = train_with(app, 0, 2, 1, labels, memory=(seg,), training=REHEARSE)
    assert reply.content.metric_records[METRICS]["memory-items"] == 12
    student = client_runtime(cfg).store.load(0)["model"]
    model = new_student(cfg, data, 0)
    model.load_state_dict(student)
    with torch.no_grad():
        toward = torch.softmax(model.eval()(x), 1)[:, 7].mean()
    client_runtime(cfg).store.clear()
    train_with(app, 0, 2, 1, training=REHEARSE)  # the same round without the memory
    model.load_state_dict(client_runtime(cfg).store.load(0)["model"])
    with torch.no_grad():
        without = torch.softmax(model.eval()(x), 1)[:, 7].mean()
    assert toward > without + 0.1  # measured: 0.21 against 0.015
    bad = {MEMORY: encode(torch.full((5, 10), 0.1), "float16", SOFT_LABELS, kind="probs")}
    with pytest.raises(ValueError, match="malformed memory soft labels"):
        train_with(app, 0, 3, 1, bad, memory=(seg,))
    huge = ProxySegment(0, 11, 10**9)  # a hostile server cannot make a client build it
    with pytest.raises(ValueError, match="expected 1 to 12 each"):
        train_with(app, 0, 3, 1, labels, memory=(huge,))
    with pytest.raises(ValueError, match="expected distinct tasks"):
        train_with(app, 0, 3, 1, labels, memory=(seg, seg))


def test_student_memory_bank_keeps_the_last_labels_of_the_task_left(plain_cfg):
    cfg = plain_cfg(*LIFELONG, *STUDENT_MEMORY, "mitigation.source=bank")
    app = build_client_app(cfg)
    store = client_runtime(cfg).store
    gen = torch.Generator().manual_seed(0)

    def teacher():
        probs = torch.softmax(torch.randn(30, 10, generator=gen), 1)
        return probs, {TEACHER: encode(probs, "float16", SOFT_LABELS, kind="probs")}

    train_with(app, 2, 1, 0, teacher()[1])
    last, arrays = teacher()
    reply = train_with(app, 2, 2, 0, arrays)  # the last round of task 0
    assert "memory-items" not in reply.content.metric_records[METRICS]  # no past task yet
    assert store.load(2)["bank"] == {}
    reply = train_with(app, 2, 3, 1, teacher()[1])  # task 1 begins
    assert reply.content.metric_records[METRICS]["memory-items"] == 12
    kept = store.load(2)["bank"]["0"]
    sent = last.half().float()
    rows = [int(torch.argmin((sent - p.float()).abs().sum(1))) for p in kept["probs"]]
    assert len(set(rows)) == 12  # 12 distinct items of round 2's labels, exactly as sent
    assert torch.equal(kept["probs"].float(), sent[rows])
    items = client_runtime(cfg).data.proxy_inputs([ProxySegment(0, 3, 30)])
    assert torch.equal(kept["x"], items[rows].half())
    assert set(store.load(2)["bank"]) == {"0"}  # the current task is never banked


def test_inversion_makes_the_model_believe_the_targets():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    targets = soft_targets([3, 8], 40, 10, 4.0, np.random.default_rng(0))
    assert torch.allclose(targets.sum(1), torch.ones(40)) and targets[:, [3, 8]].sum() == 40
    assert (targets[0::2, 3] > targets[0::2, 8]).float().mean() > 0.7  # even items lean to 3

    def kl(x):
        return torch.nn.functional.kl_div(torch.log_softmax(model(x), 1), targets, reduction="sum")

    hp = Inversion(steps=60, lr=0.1)
    x = invert(model, targets, (1, 8, 8), (-1.0, 2.0), hp, torch.Generator().manual_seed(0))
    start = torch.randn((40, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    assert x.shape == (40, 1, 8, 8) and x.min() >= -1.0 and x.max() <= 2.0
    assert kl(x) < 0.3 * kl(start.clamp(-1.0, 2.0))
    assert all(p.requires_grad for p in model.parameters())  # the model is left as it was


def test_student_memory_synthetic_sends_inputs_and_keeps_no_public_item(plain_cfg):
    state = lifelong_state(
        plain_cfg,
        "strategy=fedmd",
        "lifelong.proxy=drifting",
        *STUDENT_MEMORY,
        "mitigation.source=synthetic",
        "mitigation.synthetic_items=30",
        "mitigation.synthesis_steps=5",
    )
    logits_round(state, 1)
    state.mitigation.on_task_end(0)
    synthetic = state.mitigation.synthetic[0]
    assert synthetic.shape == (30, *state.data.input_shape)
    r = begin_round(state, 2)
    mem_x, _, _ = state.mitigation.teacher_batch(r.proxy_x, torch.zeros(len(r.proxy_x), 10))
    assert torch.equal(mem_x[len(r.proxy_x) :], synthetic)  # the teacher's memory is synthetic
    _, downloads = prepare_round(state, 2)
    assert all(p.memory == () for p in plans_of(downloads))  # no public item is named
    records = downloads[0][1].array_records
    sent = torch.from_numpy(records[MEMORY_INPUTS]["inputs"].numpy()).float()
    assert sent.shape == (12, *state.data.input_shape)  # student_items of the one past task
    rows = [int(torch.argmin((synthetic.half().float() - s).flatten(1).abs().sum(1))) for s in sent]
    assert torch.equal(synthetic.half().float()[rows], sent)  # drawn from the synthesised set
    cfg = plain_cfg(*LIFELONG, *STUDENT_MEMORY, "mitigation.source=synthetic")
    app = build_client_app(cfg)
    memory = {k: records[k] for k in (MEMORY, MEMORY_INPUTS)}
    reply = train_with(app, 0, 2, 1, memory)
    assert reply.content.metric_records[METRICS]["memory-items"] == 12
    for bad in ((13, *state.data.input_shape), (12, 1, 5, 5)):  # too many; wrong shape
        inputs = ArrayRecord({"inputs": array_from_numpy(np.zeros(bad, dtype=np.float16))})
        with pytest.raises(ValueError, match="malformed memory"):
            train_with(app, 0, 3, 1, {**memory, MEMORY_INPUTS: inputs})


def test_a_bank_needs_soft_labels_sent_down(tiny_cfg):
    with pytest.raises(ConfigError) as info:
        validate(tiny_cfg(*LIFELONG, "strategy=feddf", "mitigation=student_memory"))
    assert info.value.key == "mitigation.source" and "broadcast or synthetic" in str(info.value)
    validate(tiny_cfg(*LIFELONG, "strategy=feddf", *STUDENT_MEMORY, "mitigation.source=broadcast"))

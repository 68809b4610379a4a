"""Mitigations against forgetting: server hooks and client hooks, without Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from fedkd.client import build_client_app
from fedkd.config import validate
from fedkd.errors import ConfigError
from fedkd.local_round import client_runtime
from fedkd.protocol import CONFIG, METRICS, ROLE_REVIEW, TEACHER, TRAIN, ProxySegment, RoundPlan
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


def train_call(app, cfg, pid, rnd, task):
    plan = RoundPlan(
        round=rnd,
        task=task,
        role="learn",
        reply="logits",
        proxy=(ProxySegment(task, 3, 30),),
        codec="float16",
        training=LocalTraining(
            epochs=1,
            batch_size=16,
            lr=0.05,
            momentum=0.9,
            weight_decay=0.0,
            alpha=0.9,
            temperature=3.0,
        ),
    )
    msg = Message(RecordDict({CONFIG: plan.to_record()}), dst_node_id=10 + pid, message_type=TRAIN)
    return app(msg, context(pid))


def test_client_lwf_freezes_the_previous_student_at_a_task_switch(plain_cfg):
    cfg = plain_cfg(*LIFELONG, "mitigation=client_lwf")
    app = build_client_app(cfg)
    store = client_runtime(cfg).store
    first = train_call(app, cfg, 0, 1, 0)
    assert "initial-task-accuracy" in first.content.metric_records[METRICS]
    after_task0 = store.load(0)["model"]
    assert "prev_model" not in store.load(0)
    train_call(app, cfg, 0, 2, 1)
    state = store.load(0)
    assert all(torch.equal(state["prev_model"][k], v) for k, v in after_task0.items())
    assert state["task"] == 1


def test_replay_keeps_exemplars_of_the_task_left_behind(plain_cfg):
    cfg = plain_cfg(*LIFELONG, "mitigation=replay", "mitigation.replay_size=7")
    app = build_client_app(cfg)
    store = client_runtime(cfg).store
    train_call(app, cfg, 1, 1, 0)
    reply = train_call(app, cfg, 1, 2, 1)
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
    ],
)
def test_mitigations_that_do_not_fit_a_strategy_are_refused(tiny_cfg, overrides):
    with pytest.raises(ConfigError) as info:
        validate(tiny_cfg(*LIFELONG, *overrides))
    assert info.value.key == "mitigation"

"""The device-side policy: node config keys parsed and checked, and every run config
and round plan outside a node's policy refused before any training, naming the
setting and the plan's value (never the node's own limit, which stays in its log)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
from flwr.app import Context, Message, RecordDict

from fedkd import app as flwr_app
from fedkd import node as node_side
from fedkd.errors import ConfigError
from fedkd.node_config import RunRefused
from fedkd.node_policy import NodePolicy, local_steps
from fedkd.protocol import (
    CONFIG,
    REPLY_LOGITS,
    REPLY_NONE,
    REPLY_WEIGHTS,
    TRAIN,
    ProxySegment,
    RoundPlan,
)
from fedkd.training import LocalTraining


def plan(reply=REPLY_LOGITS, epochs=1, batch_size=32, **fields) -> RoundPlan:
    return RoundPlan(
        round=3,
        task=0,
        role="learn",
        reply=reply,
        proxy=(ProxySegment(0, 1, 100),),
        codec="float16",
        training=LocalTraining(epochs=epochs, batch_size=batch_size, lr=0.1),
        **fields,
    )


def run(strategy="dsfl", mode="none", noise=1.0, dp_epochs=None, dp_batch_size=None, **kw):
    """The parts of a run's config a policy reads."""
    privacy = SimpleNamespace(
        mode=mode,
        noise_multiplier=noise,
        epochs=dp_epochs,
        batch_size=dp_batch_size,
        secure_noise=kw.get("secure", True),
        delta=1e-5,
        max_grad_norm=1.0,
        lr=None,
        momentum=None,
        optimizer="sgd",
    )
    train = SimpleNamespace(epochs=kw.get("epochs", 1), batch_size=32)
    distill = SimpleNamespace(
        client_epochs=kw.get("kd_epochs", 1), client_batch_size=50, client_schedule="joint"
    )
    return SimpleNamespace(
        strategy={"name": strategy},
        plugins=[],
        privacy=privacy,
        rounds=kw.get("rounds", 20),
        train=train,
        distill=distill,
    )


@pytest.mark.parametrize(
    "node_config, key, allowed",
    [
        ({"allow-replies": "soft"}, "allow-replies", "one or more of .*logits.*comma-separated"),
        ({"allow-replies": ""}, "allow-replies", "one or more of"),
        ({"allow-replies": 1}, "allow-replies", "one or more of"),
        ({"max-epochs": 0}, "max-epochs", "an integer >= 1"),
        ({"max-epochs": "2"}, "max-epochs", "an integer >= 1"),
        ({"max-batch-size": 1.5}, "max-batch-size", "an integer >= 1"),
        ({"max-batch-size": True}, "max-batch-size", "an integer >= 1"),
        ({"min-privacy": "strong"}, "min-privacy", "one of none, client, sample"),
        ({"min-privacy": "sample", "min-noise-multiplier": -1}, "min-noise", "a number > 0"),
        ({"max-epsilon": 0}, "max-epsilon", "a number > 0"),
        ({"max-steps": 0}, "max-steps", "an integer >= 1"),
        ({"min-noise-multiplier": 1.0}, "min-noise-multiplier", "only with min-privacy"),
    ],
)
def test_a_wrong_policy_value_is_one_config_error_naming_the_key(node_config, key, allowed):
    with pytest.raises(ConfigError, match=f"node config {key}.*is not allowed: {allowed}"):
        NodePolicy.parse(node_config)
    with pytest.raises(ConfigError, match=key):  # the same through NodeSettings
        flwr_app.NodeSettings.parse({"partition-id": 0, **node_config})


def test_node_settings_carry_the_policy_and_the_auth_key():
    node = flwr_app.NodeSettings.parse(
        {
            "partition-id": 1,
            "auth-key": "/keys/node-1",
            "config": "/etc/fedkd/node.yaml",
            "allow-replies": "weights, logits",
            "max-epochs": 2,
            "max-batch-size": 64,
            "min-privacy": "sample",
            "min-noise-multiplier": 1,
            "max-epsilon": 8,
        }
    )
    assert (node.auth_key, node.config) == ("/keys/node-1", "/etc/fedkd/node.yaml")
    expected = NodePolicy(
        allow_replies=("logits", "weights"),
        max_epochs=2,
        max_batch_size=64,
        min_privacy="sample",
        min_noise_multiplier=1.0,
        max_epsilon=8.0,
    )
    assert node.policy == expected
    assert flwr_app.NodeSettings.parse({"partition-id": 0}).policy == NodePolicy()


def plan_refusal(policy: NodePolicy, p: RoundPlan, cfg, shard=100, nbytes=0) -> str:
    broken = policy.plan_violations(p, cfg, shard, nbytes)
    assert broken, "expected a refusal"
    return "; ".join(broken)


def test_a_logits_only_node_refuses_a_plan_asking_for_weights():
    logits_only = NodePolicy.parse({"allow-replies": "logits"})
    message = plan_refusal(logits_only, plan(REPLY_WEIGHTS), run("fedavg"))
    assert "reply='weights' is outside allow-replies" in message
    assert not logits_only.plan_violations(plan(REPLY_LOGITS), run("fedavg"), 100, 0)
    assert not logits_only.plan_violations(plan(REPLY_NONE), run("local"), 100, 0)


def test_by_default_a_node_sends_only_soft_labels_whatever_the_run_names():
    """On the old main the default was the run's own strategy's reply kind, so a run
    naming strategy=fedavg got every device's weights."""
    default = NodePolicy()
    assert default.allow_replies == ("logits",)
    assert "reply='weights'" in plan_refusal(default, plan(REPLY_WEIGHTS), run("fedavg"))
    assert "fedavg" not in default.run_violations(run("dsfl"))
    assert default.run_violations(run("fedavg")) == [
        "the strategy's reply (weights) is outside allow-replies"
    ]
    assert not NodePolicy.parse({"allow-replies": "weights"}).run_violations(run("fedavg"))


def test_every_cost_a_plan_carries_is_bounded_by_default():
    default = NodePolicy()
    assert not default.plan_violations(plan(), run(), 9318, 200_000)
    sequential = replace(plan().training, schedule="sequential", kd_epochs=10**9)
    assert "kd_epochs=1000000000 exceed max-epochs" in plan_refusal(
        default, replace(plan(), training=sequential), run()
    )
    many = tuple(ProxySegment(0, i, 1) for i in range(100_000))
    message = plan_refusal(default, plan(memory=many), run())
    assert "100001 proxy/teacher/memory segments exceed max-segments" in message
    huge = plan(teacher_proxy=(ProxySegment(0, 1, 10**9),))
    assert "items exceed max-items" in plan_refusal(default, huge, run())
    assert "max-download-bytes" in plan_refusal(default, plan(), run(), nbytes=2**30)
    assert "round=3 is outside the run's rounds" in plan_refusal(default, plan(), run(rounds=2))
    assert "max-steps" in plan_refusal(NodePolicy(max_steps=3), plan(), run(), shard=9318)
    assert default.run_violations(run(rounds=2**62)) == ["rounds exceeds max-rounds"]


def test_local_steps_counts_every_phase():
    cfg = run()
    assert local_steps(plan(), cfg, 100) == 4  # ceil(100 / 32)
    seq = replace(plan().training, schedule="sequential", kd_epochs=2, kd_batch_size=50)
    assert local_steps(replace(plan(), training=seq), cfg, 100) == 4 + 2 * 2
    dp = run(mode="sample", dp_epochs=3, dp_batch_size=10)
    assert local_steps(plan(), dp, 100) == 30


def test_epochs_and_batch_size_beyond_the_nodes_limits_are_refused():
    policy = NodePolicy.parse({"max-epochs": 2, "max-batch-size": 32})
    assert not policy.plan_violations(plan(epochs=2, batch_size=32), run(), 100, 0)
    assert "epochs=5/kd_epochs=1 exceed max-epochs" in plan_refusal(policy, plan(epochs=5), run())
    message = plan_refusal(policy, plan(epochs=3, batch_size=64), run())
    assert "batch_size=64/50 exceeds max-batch-size" in message
    assert "=2" not in message and "=32" not in message  # the node's limits stay on the node


def test_dp_sgds_own_epochs_and_batch_size_are_held_to_the_same_limits():
    policy = NodePolicy.parse({"max-epochs": 2, "max-batch-size": 256})
    assert not policy.run_violations(run(mode="sample", dp_epochs=2, dp_batch_size=256))
    broken = policy.run_violations(run(mode="sample", dp_epochs=4, dp_batch_size=512))
    assert broken == [
        "privacy.epochs exceeds max-epochs",
        "privacy.batch_size exceeds max-batch-size",
    ]


def test_privacy_below_the_nodes_floor_is_refused():
    policy = NodePolicy.parse({"min-privacy": "sample", "min-noise-multiplier": 1.0})
    assert not policy.run_violations(run(mode="sample", noise=1.0))
    assert policy.run_violations(run(mode="none")) == ["privacy.mode is below min-privacy"]
    assert "privacy.mode is below min-privacy" in policy.run_violations(run(mode="client", noise=2))
    assert policy.run_violations(run(mode="sample", noise=0.5)) == [
        "privacy.noise_multiplier is below the node's noise floor"
    ]
    client_floor = NodePolicy.parse({"min-privacy": "client"})
    assert not client_floor.run_violations(run(mode="sample"))  # sample is at least client


def test_min_privacy_implies_a_noise_floor_and_secret_noise():
    """On the old main min-privacy=sample accepted noise_multiplier=0 and
    min-privacy=client accepted secure_noise=false."""
    sample = NodePolicy.parse({"min-privacy": "sample"})
    assert sample.noise_floor == 0.5
    assert sample.run_violations(run(mode="sample", noise=0.0)) == [
        "privacy.noise_multiplier is below the node's noise floor"
    ]
    client = NodePolicy.parse({"min-privacy": "client"})
    assert client.run_violations(run(mode="client", secure=False)) == [
        "privacy.secure_noise is off: this node requires secret noise"
    ]


def test_the_flwr_app_refuses_before_any_training(monkeypatch, tmp_path):
    delegated = []
    monkeypatch.setattr(flwr_app, "_delegate", lambda cfg, m, c: delegated.append(m) or "trained")
    fake = {"simulation": {"num_gpus": 0, "num_cpus": 1}, "privacy": {}}
    monkeypatch.setattr(node_side, "requested_cfg", lambda context, node: fake)
    monkeypatch.setattr(node_side, "typed", lambda cfg: run("fedavg"))
    monkeypatch.setattr("fedkd.client_runtime.shard_size", lambda cfg, pid, task: 100)

    def train(node_config, reply):
        msg = Message(
            RecordDict({CONFIG: plan(reply).to_record()}), dst_node_id=99, message_type=TRAIN
        )
        ctx = Context(
            run_id=7,
            node_id=99,
            node_config={"state-dir": str(tmp_path), **node_config},
            state=RecordDict(),
            run_config={"overrides": "strategy=fedavg"},
        )
        return flwr_app.client_train(msg, ctx)

    with pytest.raises(RunRefused, match=r"reply \(weights\) is outside allow-replies"):
        train({"partition-id": 0}, REPLY_WEIGHTS)  # the default: soft labels only
    assert delegated == []  # nothing trained
    weights_ok = {"partition-id": 0, "allow-replies": "weights"}
    assert train(weights_ok, REPLY_WEIGHTS) == "trained"

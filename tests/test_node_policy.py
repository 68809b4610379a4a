"""The device-side policy: node config keys parsed and checked, and every round plan
outside a node's policy refused before any training, naming the setting, the plan's
value and the node's limit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from flwr.app import Context, Message, RecordDict

from fedkd import app as flwr_app
from fedkd.errors import ConfigError
from fedkd.node_policy import NodePolicy
from fedkd.protocol import CONFIG, REPLY_LOGITS, REPLY_NONE, REPLY_WEIGHTS, TRAIN, RoundPlan
from fedkd.training import LocalTraining


def plan(reply=REPLY_LOGITS, epochs=1, batch_size=32) -> RoundPlan:
    return RoundPlan(
        round=3,
        task=0,
        role="learn",
        reply=reply,
        proxy=(),
        codec="float16",
        training=LocalTraining(epochs=epochs, batch_size=batch_size, lr=0.1),
    )


def run(strategy="dsfl", mode="none", noise=1.0, dp_epochs=None, dp_batch_size=None):
    """The parts of a run's config a policy reads."""
    privacy = SimpleNamespace(
        mode=mode, noise_multiplier=noise, epochs=dp_epochs, batch_size=dp_batch_size
    )
    return SimpleNamespace(strategy={"name": strategy}, plugins=[], privacy=privacy)


@pytest.mark.parametrize(
    "node_config, key, allowed",
    [
        ({"allow-replies": "soft"}, "allow-replies", "logits, weights or logits,weights"),
        ({"allow-replies": ""}, "allow-replies", "logits, weights"),
        ({"allow-replies": 1}, "allow-replies", "logits, weights"),
        ({"max-epochs": 0}, "max-epochs", "an integer >= 1"),
        ({"max-epochs": "2"}, "max-epochs", "an integer >= 1"),
        ({"max-batch-size": 1.5}, "max-batch-size", "an integer >= 1"),
        ({"max-batch-size": True}, "max-batch-size", "an integer >= 1"),
        ({"min-privacy": "strong"}, "min-privacy", "one of none, client, sample"),
        ({"min-privacy": "sample", "min-noise-multiplier": -1}, "min-noise", "a number >= 0"),
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
            "allow-replies": "weights, logits",
            "max-epochs": 2,
            "max-batch-size": 64,
            "min-privacy": "sample",
            "min-noise-multiplier": 1,
        }
    )
    assert node.auth_key == "/keys/node-1"
    assert node.policy == NodePolicy(("logits", "weights"), 2, 64, "sample", 1.0)
    assert flwr_app.NodeSettings.parse({"partition-id": 0}).policy == NodePolicy()


def refusal(policy: NodePolicy, p: RoundPlan, cfg) -> str:
    with pytest.raises(ValueError, match="this node's policy refuses round 3's plan") as info:
        policy.check(p, cfg)
    return str(info.value)


def test_a_logits_only_node_refuses_a_plan_asking_for_weights():
    logits_only = NodePolicy.parse({"allow-replies": "logits"})
    message = refusal(logits_only, plan(REPLY_WEIGHTS), run("fedavg"))
    assert "reply='weights' is outside allow-replies=logits" in message
    logits_only.check(plan(REPLY_LOGITS), run("fedavg"))
    logits_only.check(plan(REPLY_NONE), run("local"))  # metrics only: always allowed


def test_by_default_a_node_sends_only_its_runs_reply_kind():
    default = NodePolicy()
    message = refusal(default, plan(REPLY_WEIGHTS), run("dsfl"))  # state dict from dsfl
    assert "reply='weights' is outside allow-replies=logits" in message
    default.check(plan(REPLY_LOGITS), run("dsfl"))
    default.check(plan(REPLY_WEIGHTS), run("fedavg"))
    assert "allow-replies=weights" in refusal(default, plan(REPLY_LOGITS), run("feddf"))


def test_epochs_and_batch_size_beyond_the_nodes_limits_are_refused():
    policy = NodePolicy.parse({"max-epochs": 2, "max-batch-size": 32})
    policy.check(plan(epochs=2, batch_size=32), run())
    assert "epochs=5 exceeds max-epochs=2" in refusal(policy, plan(epochs=5), run())
    message = refusal(policy, plan(epochs=3, batch_size=64), run())
    assert "epochs=3 exceeds max-epochs=2; batch_size=64 exceeds max-batch-size=32" in message


def test_dp_sgds_own_epochs_and_batch_size_are_held_to_the_same_limits():
    policy = NodePolicy.parse({"max-epochs": 2, "max-batch-size": 256})
    policy.check(plan(), run(mode="sample", dp_epochs=2, dp_batch_size=256))
    message = refusal(policy, plan(), run(mode="sample", dp_epochs=4, dp_batch_size=512))
    assert "privacy.epochs=4 exceeds max-epochs=2" in message
    assert "privacy.batch_size=512 exceeds max-batch-size=256" in message


def test_privacy_below_the_nodes_floor_is_refused():
    policy = NodePolicy.parse({"min-privacy": "sample", "min-noise-multiplier": 1.0})
    policy.check(plan(), run(mode="sample", noise=1.0))
    message = refusal(policy, plan(), run(mode="none"))
    assert "privacy.mode='none' is below min-privacy=sample" in message
    message = refusal(policy, plan(), run(mode="client", noise=2.0))
    assert "privacy.mode='client' is below min-privacy=sample" in message
    message = refusal(policy, plan(), run(mode="sample", noise=0.5))
    assert "privacy.noise_multiplier=0.5 is below min-noise-multiplier=1.0" in message
    client_floor = NodePolicy.parse({"min-privacy": "client"})
    client_floor.check(plan(), run(mode="sample"))  # sample is at least client


def test_the_flwr_app_refuses_before_any_training(monkeypatch):
    delegated = []
    monkeypatch.setattr(flwr_app, "_delegate", lambda m, c: delegated.append(m) or "trained")
    monkeypatch.setattr(flwr_app, "run_cfg", lambda overrides: {"overrides": overrides})
    monkeypatch.setattr(flwr_app, "typed", lambda cfg: run("fedavg"))

    def train(node_config, reply):
        msg = Message(
            RecordDict({CONFIG: plan(reply).to_record()}), dst_node_id=99, message_type=TRAIN
        )
        ctx = Context(
            run_id=7,
            node_id=99,
            node_config=node_config,
            state=RecordDict(),
            run_config={"overrides": "strategy=fedavg"},
        )
        return flwr_app.client_train(msg, ctx)

    logits_only = {"partition-id": 0, "allow-replies": "logits"}
    with pytest.raises(ValueError, match="reply='weights' is outside allow-replies=logits"):
        train(logits_only, REPLY_WEIGHTS)
    assert delegated == []  # nothing trained
    assert train({"partition-id": 0}, REPLY_WEIGHTS) == "trained"  # fedavg's own kind

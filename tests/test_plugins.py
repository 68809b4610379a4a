"""Extending fedkd without editing it: a soft-label strategy (tests/plugin_vote.py)
and a mitigation (tests/plugin_rehearsal.py), each one module, registered by their
own decorators and named in `plugins`, run through a real simulation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from fedkd.comm.codecs import encode, payload_bytes
from fedkd.data.federated import federated_data
from fedkd.errors import ConfigError
from fedkd.protocol import LOGITS
from fedkd.results import read_metrics
from tests.conftest import TINY

PLUGINS = ("plugins=[tests.plugin_vote,tests.plugin_rehearsal]",)
VOTE = ("~strategy", "+strategy.name=vote", "+strategy.smoothing=0.2")
REHEARSAL = ("~mitigation", "+mitigation.name=rehearsal", "+mitigation.items=20")
TWO_TASKS = (
    "lifelong=class_incremental",
    "lifelong.num_tasks=2",
    "lifelong.rounds_per_task=1",
    "lifelong.proxy=drifting",
)


def test_plugin_settings_are_checked_by_their_own_schemas(tiny_cfg):
    from fedkd.compose import validate

    settings = validate(tiny_cfg(*PLUGINS, *VOTE, *REHEARSAL, *TWO_TASKS))
    assert settings.strategy["name"] == "vote" and settings.mitigation["name"] == "rehearsal"
    for bad, key in (
        ("+strategy.smoothing=1.5", "strategy.smoothing"),
        ("+mitigation.items=0", "mitigation.items"),
        ("+mitigation.size=3", "mitigation.size"),  # not a rehearsal setting
    ):
        overrides = [o for o in (*VOTE, *REHEARSAL) if o.split("=")[0] != bad.split("=")[0]]
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(tiny_cfg(*PLUGINS, *overrides, bad, *TWO_TASKS))
    with pytest.raises(ConfigError, match="plugins"):
        validate(tiny_cfg("plugins=[tests.no_such_module]"))


@pytest.mark.ray
def test_plugin_strategy_and_mitigation_run_in_a_real_simulation(tmp_path):
    from tests.test_simulation import fedkd_sim

    run = tmp_path / "run"
    fedkd_sim(*TINY, *PLUGINS, *VOTE, *REHEARSAL, *TWO_TASKS, f"hydra.run.dir={run}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["strategy"] == "vote" and summary["mitigation"] == "rehearsal"
    rows = read_metrics(run)
    assert [r["replies"] for r in rows] == [3, 3] and rows[-1]["teacher_accuracy"] > 0
    # round 2 (task 1): each upload covers task 1's subset plus the 20 items of task 0
    # the mitigation remembered, in the strategy's codec
    data = federated_data(yaml.safe_load((run / "config.yaml").read_text()))
    items = data.proxy_pool_size(1) + min(20, data.proxy_pool_size(0))
    one = payload_bytes(encode(torch.zeros(items, data.num_classes), "float16", LOGITS, "logits"))
    assert rows[1]["bytes_up"] == 3 * one


SHARPEN = ("plugins=[tests.plugin_sharpen]", "~strategy", "+strategy.name=sharpen")


@pytest.mark.ray
@pytest.mark.parametrize("execution", ["per_client", "cohort"])
def test_a_plugin_algorithm_with_its_own_loss_term_and_reply_kind_runs(tmp_path, execution):
    """tests/plugin_sharpen.py: both halves in one module outside fedkd. Its clients
    fold their own loss term (counted in the reply) and reply with a kind no
    built-in strategy knows; the server checks and aggregates it."""
    from tests.test_simulation import fedkd_sim

    run = tmp_path / "run"
    nodes = ("simulation.cohort_nodes=2",) if execution == "cohort" else ()
    fedkd_sim(*TINY, *SHARPEN, f"simulation.execution={execution}", *nodes, f"hydra.run.dir={run}")
    rows = read_metrics(run)
    assert [r["replies"] for r in rows] == [3, 3]
    assert all(r["term_folds"] > 0 and 0 < r["histogram_max"] <= 1 for r in rows)
    from tests.plugin_sharpen import histogram_record

    classes = federated_data(yaml.safe_load((run / "config.yaml").read_text())).num_classes
    one = payload_bytes(histogram_record(np.zeros(classes), 0))
    assert [r["bytes_up"] for r in rows] == [3 * one, 3 * one]

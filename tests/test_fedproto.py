"""FedProto (strategies/fedproto.py): class prototypes up and down, no proxy set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from torch import nn

from fedkd.errors import ConfigError
from fedkd.local_round import client_reply
from fedkd.protocol import METRICS
from fedkd.results import read_metrics
from fedkd.round_loop import conclude_round, prepare_round
from strategies.fedproto import PROTOTYPES, last_linear, representations
from strategies.per_class import class_record
from tests.conftest import TINY
from tests.server_harness import reply, server_state


def proto_reply(pid, protos, counts, n=100, rnd=1):
    metrics = MetricRecord({"round": rnd, "num-examples": n, "test-accuracy": 0.5})
    record = class_record(torch.as_tensor(protos), torch.as_tensor(counts))
    return reply(pid, RecordDict({METRICS: metrics, PROTOTYPES: record}))


def test_a_representation_is_the_input_of_the_last_linear_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x, seen = torch.randn(5, 4), []
    with representations(model, seen):
        model(x)
    model(x)  # the hook is gone
    assert len(seen) == 1 and torch.equal(seen[0], torch.relu(model[0](x)))
    assert last_linear(model) is model[2]


def test_prototypes_are_count_weighted_capped_and_hostile_replies_are_refused(plain_cfg):
    state = server_state(plain_cfg, "strategy=fedproto", "strategy.max_weight_share=0.8")
    fp = state.strategy
    r, downloads = prepare_round(state, 1)
    c, d = state.data.num_classes, fp.width
    assert PROTOTYPES not in downloads[0][1].array_records
    counts_a, counts_b = torch.zeros(c), torch.zeros(c)
    counts_a[0], counts_b[0] = 30, 10
    stats = conclude_round(
        state,
        r,
        [
            proto_reply(0, torch.ones(c, d), counts_a),
            proto_reply(1, 2 * torch.ones(c, d), counts_b),
            proto_reply(2, torch.ones(c, d + 1), counts_a),  # another width
        ],
    )
    assert stats["replies"] == 2 and stats["rejected"] == 1
    assert torch.allclose(fp.means[0], torch.full((d,), 1.25))
    assert fp.known.tolist() == [1.0] + [0.0] * (c - 1)
    r2, _ = prepare_round(state, 2)
    huge = conclude_round(state, r2, [proto_reply(0, torch.full((c, d), 1e9), counts_a, rnd=2)])
    assert huge["rejected"] == 1


def test_a_client_refuses_prototypes_of_another_width(plain_cfg):
    plain = plain_cfg("strategy=fedproto")
    state = server_state(plain_cfg, "strategy=fedproto")
    c, d = state.data.num_classes, state.strategy.width
    state.strategy.means, state.strategy.known = torch.zeros(c, d), torch.ones(c)
    _, downloads = prepare_round(state, 1)
    pid, content = downloads[0]
    content[PROTOTYPES] = ArrayRecord(
        {"means": Array(np.zeros((c, d + 3), np.float32)), "counts": Array(np.ones(c, np.float32))}
    )
    with pytest.raises(ValueError, match="malformed 'prototypes' from the server"):
        client_reply(plain, pid, content)


def test_fedproto_refuses_dp_sgd(tiny_cfg):
    from fedkd.compose import validate

    with pytest.raises(ConfigError, match=r"privacy\.mode.*none"):
        validate(tiny_cfg("strategy=fedproto", "privacy=sample"))


@pytest.mark.ray
def test_fedproto_runs_in_a_real_simulation(tmp_path):
    from tests.test_simulation import fedkd_sim

    run = tmp_path / "run"
    fedkd_sim(*TINY, "strategy=fedproto", "rounds=3", f"hydra.run.dir={run}")
    rows = read_metrics(run)
    assert [r["replies"] for r in rows] == [3, 3, 3]
    assert rows[0]["bytes_down"] == 0 and rows[1]["bytes_down"] > 0
    assert rows[-1]["known_classes"] > 0 and rows[-1]["teacher_accuracy"] is None
    assert rows[-1]["client_accuracy_mean"] > rows[0]["client_accuracy_mean"]

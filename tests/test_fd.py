"""FD (strategies/fd.py): per-class mean logits up and down, no proxy set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedkd.comm.codecs import payload_bytes
from fedkd.data.federated import federated_data
from fedkd.errors import ConfigError
from fedkd.local_round import client_reply
from fedkd.protocol import METRICS
from fedkd.results import read_metrics
from fedkd.round_loop import conclude_round, prepare_round
from strategies.fd import CLASS_LOGITS
from strategies.per_class import class_record
from tests.conftest import TINY
from tests.server_harness import reply, server_state


def fd_reply(pid, logits, counts, n=100, rnd=1) -> object:
    metrics = MetricRecord({"round": rnd, "num-examples": n, "test-accuracy": 0.5})
    record = class_record(torch.as_tensor(logits), torch.as_tensor(counts))
    return reply(pid, RecordDict({METRICS: metrics, CLASS_LOGITS: record}))


def test_the_class_mean_is_count_weighted_capped_and_hostile_replies_are_refused(plain_cfg):
    state = server_state(plain_cfg, "strategy=fd", "strategy.max_weight_share=0.8")
    fd = state.strategy
    r, downloads = prepare_round(state, 1)
    c = state.data.num_classes
    assert CLASS_LOGITS not in downloads[0][1].array_records  # nothing known in round 1
    ones, twos = torch.ones(c, c), 2 * torch.ones(c, c)
    counts_a = torch.zeros(c)
    counts_a[0], counts_a[1] = 30, 10
    counts_b = torch.zeros(c)
    counts_b[0], counts_b[1] = 10, 1000  # nearly all of class 1: capped at 0.8
    bad_counts = torch.full((c,), -1.0)
    stats = conclude_round(
        state,
        r,
        [
            fd_reply(0, ones, counts_a),
            fd_reply(1, twos, counts_b),
            fd_reply(2, torch.full((c, c), 1e6), counts_a),  # a logit past max_logit
        ],
    )
    assert stats["replies"] == 2 and stats["rejected"] == 1
    assert torch.allclose(fd.means[0], torch.full((c,), 1.25))  # (30*1 + 10*2) / 40
    assert torch.allclose(fd.means[1], torch.full((c,), 1.8))  # 0.2 * 1 + 0.8 * 2
    assert fd.known.tolist() == [1.0, 1.0] + [0.0] * (c - 2)
    r2, _ = prepare_round(state, 2)
    refused = conclude_round(state, r2, [fd_reply(0, ones, bad_counts, rnd=2)])
    assert refused["rejected"] == 1


def test_a_client_refuses_malformed_class_logits_from_the_server(plain_cfg):
    plain = plain_cfg("strategy=fd")
    state = server_state(plain_cfg, "strategy=fd")
    c = state.data.num_classes
    state.strategy.means, state.strategy.known = torch.zeros(c, c), torch.ones(c)
    _, downloads = prepare_round(state, 1)
    pid, content = downloads[0]
    content[CLASS_LOGITS] = ArrayRecord(
        {"means": Array(np.zeros((c, c + 1), np.float32)), "counts": Array(np.ones(c, np.float32))}
    )
    with pytest.raises(ValueError, match="malformed 'class-logits' from the server"):
        client_reply(plain, pid, content)


def test_fd_refuses_dp_sgd_which_would_not_train_its_term(tiny_cfg):
    from fedkd.compose import validate

    with pytest.raises(ConfigError, match=r"privacy\.mode.*none"):
        validate(tiny_cfg("strategy=fd", "privacy=sample"))


@pytest.mark.ray
def test_fd_runs_in_a_real_simulation_with_class_sized_replies(tmp_path):
    from tests.test_simulation import fedkd_sim

    run = tmp_path / "run"
    fedkd_sim(*TINY, "strategy=fd", "rounds=3", f"hydra.run.dir={run}")
    rows = read_metrics(run)
    c = federated_data(yaml.safe_load((run / "config.yaml").read_text())).num_classes
    one = payload_bytes(class_record(torch.zeros(c, c), torch.zeros(c)))
    assert [r["bytes_up"] for r in rows] == [3 * one] * 3
    assert rows[0]["bytes_down"] == 0 and rows[1]["bytes_down"] > 0
    assert rows[-1]["known_classes"] == c and rows[-1]["teacher_accuracy"] is None
    assert rows[-1]["client_accuracy_mean"] > rows[0]["client_accuracy_mean"]

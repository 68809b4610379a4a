"""FedGKD (strategies/fedgkd.py): FedAvg plus KD from the averaged past global models."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord

from fedkd.errors import ConfigError
from fedkd.local_round import client_reply
from fedkd.results import read_metrics
from fedkd.round_loop import conclude_round, prepare_round
from strategies.fedgkd import GKD_TEACHER
from tests.conftest import TINY
from tests.server_harness import reply, server_state, weights_content, weights_of


def test_the_teacher_is_the_average_of_the_last_global_models(plain_cfg):
    state = server_state(plain_cfg, "strategy=fedgkd", "strategy.buffer_size=2")
    gkd = state.strategy
    globals_ = []
    for rnd in (1, 2, 3):
        r, downloads = prepare_round(state, rnd)
        sent = downloads[0][1].array_records
        if rnd == 1:
            assert GKD_TEACHER not in sent  # no past model yet
        else:
            teacher = dict(sent[GKD_TEACHER].to_torch_state_dict())
            past = globals_[-2:]
            key = next(k for k, v in past[-1].items() if v.is_floating_point())
            want = torch.stack([g[key] for g in past]).mean(0)
            assert torch.allclose(teacher[key], want)
        w = weights_of(gkd.model)
        moved = {k: v + 0.01 * rnd if v.is_floating_point() else v for k, v in w.items()}
        replies = [reply(pid, weights_content(moved, rnd=rnd)) for pid in r.sampled]
        conclude_round(state, r, replies)
        globals_.append(weights_of(gkd.model))
    assert len(gkd.history) == 2


def _reply_to_a_tampered_teacher(plain_cfg, tamper) -> None:
    """A client's reply to round 1 after `tamper` changed the teacher's weights the
    server sends."""
    plain = plain_cfg("strategy=fedgkd")
    state = server_state(plain_cfg, "strategy=fedgkd")
    state.strategy.history = [weights_of(state.strategy.model)]
    _, downloads = prepare_round(state, 1)
    pid, content = downloads[0]
    weights = weights_of(state.strategy.model)
    tamper(weights)
    content[GKD_TEACHER] = ArrayRecord(weights)
    client_reply(plain, pid, content)


def test_a_client_refuses_a_teacher_that_is_not_its_model(plain_cfg):
    def reshape(weights):
        weights[next(iter(weights))] = torch.zeros(3, 3)  # another shape

    with pytest.raises(ValueError, match="'gkd-teacher' is not this client's model"):
        _reply_to_a_tampered_teacher(plain_cfg, reshape)


def test_fedgkd_refuses_dp_sgd(tiny_cfg):
    from fedkd.compose import validate

    with pytest.raises(ConfigError, match=r"privacy\.mode.*none"):
        validate(tiny_cfg("strategy=fedgkd", "privacy=sample"))


@pytest.mark.ray
def test_fedgkd_runs_in_a_real_simulation_with_twice_fedavgs_download(tmp_path):
    from tests.test_simulation import fedkd_sim

    run = tmp_path / "run"
    fedkd_sim(*TINY, "strategy=fedgkd", "rounds=3", f"hydra.run.dir={run}")
    rows = read_metrics(run)
    assert [r["replies"] for r in rows] == [3, 3, 3]
    assert rows[1]["bytes_down"] == 2 * rows[0]["bytes_down"]  # global model + teacher
    assert rows[-1]["teacher_models"] == 3
    assert rows[-1]["teacher_accuracy"] > rows[0]["teacher_accuracy"]


def test_a_client_refuses_a_teacher_with_nan_weights(plain_cfg):
    def poison(weights):
        key = next(k for k, v in weights.items() if v.is_floating_point())
        weights[key] = torch.full_like(weights[key], float("nan"))

    with pytest.raises(ValueError, match="'gkd-teacher' holds NaN or Inf"):
        _reply_to_a_tampered_teacher(plain_cfg, poison)

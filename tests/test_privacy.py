"""Differential privacy: accounting, clipping and noise, DP-SGD, and private runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedkd.errors import ConfigError
from fedkd.models import create_model
from fedkd.privacy import gaussian_epsilon
from fedkd.privacy.dpsgd import DPSGD, dp_steps_per_round, dp_train_student
from fedkd.privacy.noise import DPNoise
from fedkd.privacy.upload import clip_rows, noisy_mean, private_rows
from fedkd.results import read_metrics
from fedkd.training import LocalTraining
from tests.conftest import TINY
from tests.test_client import context


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    eps = lambda sigma, steps: gaussian_epsilon(sigma, [(0.01, steps)], 1e-5)  # noqa: E731
    assert eps(1.0, 0) == 0.0 and gaussian_epsilon(1.0, [], 1e-5) == 0.0
    assert eps(1.0, 100) < eps(1.0, 1000) < eps(1.0, 10000)
    assert eps(2.0, 1000) < eps(1.0, 1000) < eps(0.7, 1000)
    assert math.isinf(gaussian_epsilon(0.0, [(0.01, 10)], 1e-5))
    # events with different sample rates compose: both count
    both = gaussian_epsilon(1.0, [(0.01, 500), (0.02, 500)], 1e-5)
    assert eps(1.0, 500) < both < gaussian_epsilon(1.0, [(0.02, 1000)], 1e-5)


def test_epsilon_agrees_with_opacus_accountant():
    """Two independent RDP implementations (dp-accounting, Opacus) on one mechanism."""
    from opacus.accountants import RDPAccountant

    opacus = RDPAccountant()
    opacus.history = [(1.1, 0.004, 2000)]
    ours = gaussian_epsilon(1.1, [(0.004, 2000)], 1e-5)
    assert ours == pytest.approx(opacus.get_epsilon(1e-5), rel=0.1)


def test_clip_rows_bounds_every_row_and_keeps_small_ones():
    v = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    out = clip_rows(v, 1.0)
    assert torch.allclose(out.norm(dim=1), torch.tensor([1.0, 0.5, 0.0]))
    assert torch.equal(out[1], v[1])


def test_private_rows_spend_the_clip_budget_on_what_softmax_sees():
    # a one-bit vote decodes to log-probabilities with a large common offset
    vote = torch.tensor([[-0.1] + [-4.5] * 9])
    out = private_rows(vote, 5.0)
    assert out.norm(dim=1).item() <= 5.0 + 1e-6
    assert torch.allclose(out.sum(1), torch.zeros(1), atol=1e-5)
    assert torch.allclose(torch.softmax(out, 1), torch.softmax(vote, 1))  # under the clip
    # clipping the raw row would have shrunk the vote's gap to about a third
    assert (out[0, 0] - out[0, 1]) > 2.5 * (clip_rows(vote, 5.0)[0, 0] - clip_rows(vote, 5.0)[0, 1])


def test_noisy_mean_is_calibrated_to_one_clients_upload():
    gen = DPNoise(torch.Generator().manual_seed(0))
    uploads = torch.randn(4, 400, 10) * 10
    exact = private_rows(uploads, 2.0).mean(0)
    assert torch.allclose(noisy_mean(uploads, 2.0, 0.0, gen), exact)
    noise = noisy_mean(uploads, 2.0, 0.5, gen) - exact
    expected_std = 0.5 * 2.0 * math.sqrt(400) / 4  # sigma * C * sqrt(n) / K
    assert noise.std().item() == pytest.approx(expected_std, rel=0.05)


def test_dp_sgd_is_seeded_and_counts_its_steps():
    x, y = torch.randn(200, 1, 12, 12), torch.randint(0, 4, (200,))
    px, tp = torch.randn(64, 1, 12, 12), torch.softmax(torch.randn(64, 4), 1)
    hp = LocalTraining(
        epochs=2, batch_size=20, lr=0.05, momentum=0.0, weight_decay=0.0, alpha=0.5,
        temperature=2.0,
    )  # fmt: skip
    states, results = [], []
    for _ in range(2):
        model = create_model("cnn_small", num_classes=4, input_shape=(1, 12, 12), seed=(0,))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        gen = torch.Generator().manual_seed(1)
        dp = DPSGD(1.0, 1.0, batch_size=20, epochs=2, lr=0.05)
        results.append(dp_train_student(model, x, y, hp, dp, gen, px, tp))
        states.append(model.state_dict())
    assert results[0] == results[1]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(before[k], states[0][k]) for k in before)
    q, steps = dp_steps_per_round(200, 20, 2)
    assert q == pytest.approx(0.1) and results[0][1] == steps == 20
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["privacy.mode=local"], "privacy.mode"),
        (["privacy.delta=0"], "privacy.delta"),
        (["privacy=client", "strategy=fedavg"], "privacy.mode"),
        (["privacy=sample", "strategy=central"], "privacy.mode"),
        (["privacy=client", "strategy.aggregator=median"], "strategy.aggregator"),
        (["privacy=sample", "privacy.optimizer=rmsprop"], "privacy.optimizer"),
        (["privacy=sample", "privacy.batch_size=0"], "privacy.batch_size"),
        (["privacy=sample", "privacy.lr=0"], "privacy.lr"),
        (["privacy=sample", "privacy.momentum=1.0"], "privacy.momentum"),
        (["privacy=sample", "privacy.activation=sigmoid"], "privacy.activation"),
        (
            ["privacy=sample", "lifelong=class_incremental", "lifelong.num_tasks=2",
             "lifelong.rounds_per_task=1", "mitigation=replay"],
            "mitigation",
        ),
    ],
)  # fmt: skip
def test_private_settings_that_cannot_work_are_refused(tiny_cfg, overrides, key):
    from fedkd.compose import validate

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(tiny_cfg(*overrides))


@pytest.mark.ray
@pytest.mark.parametrize("mode", ["sample", "client"])
def test_private_runs_report_their_budget_every_round(tmp_path, mode):
    from tests.test_simulation import fedkd_sim

    run = tmp_path / mode
    fedkd_sim(*TINY, f"privacy={mode}", "privacy.noise_multiplier=1.2", f"hydra.run.dir={run}")
    rows = read_metrics(run)
    eps = [r["epsilon"] for r in rows]
    assert all(r["delta"] == 1e-5 and r["noise_multiplier"] == 1.2 for r in rows)
    assert 0 < eps[0] < eps[1] < math.inf  # the budget grows with every round
    if mode == "client":  # all 3 of 3 clients each round: rate 1, one mechanism per round
        assert eps == [gaussian_epsilon(1.2, [(1.0, r)], 1e-5) for r in (1, 2)]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epsilon"] == eps[-1] and summary["delta"] == 1e-5
    # secret noise by default, and the summary says what clients withheld
    assert summary["dp_noise"] == "os-csprng" and "train-loss" in summary["dp_withheld"]
    if mode == "client":  # no student accuracy leaves a client under client-level DP
        assert all(r["client_accuracy_mean"] is None for r in rows)


def test_secret_noise_is_fresh_and_calibrated_seeded_noise_replays():
    secure = DPNoise()
    a, b = secure.normal((200_000,), 2.0), secure.normal((200_000,), 2.0)
    assert secure.kind == "os-csprng" and not torch.equal(a, b)
    assert a.mean().item() == pytest.approx(0.0, abs=0.02)
    assert a.std().item() == pytest.approx(2.0, rel=0.01)
    assert secure.bernoulli(200_000, 0.1).float().mean().item() == pytest.approx(0.1, abs=0.005)
    seeded = [DPNoise(torch.Generator().manual_seed(3)) for _ in range(2)]
    assert seeded[0].kind == "seeded"
    assert torch.equal(seeded[0].normal((50,), 1.0), seeded[1].normal((50,), 1.0))
    # the seeded stream is torch's own: studies replay the numbers of earlier runs
    assert torch.equal(
        DPNoise(torch.Generator().manual_seed(4)).normal((50,), 1.5),
        1.5 * torch.randn(50, generator=torch.Generator().manual_seed(4)),
    )


@pytest.mark.parametrize("mode", ["sample", "client"])
def test_dp_noise_is_secret_unless_a_study_asks_to_replay_it(tmp_path, mode):
    """Same config, same seed: secret noise gives another teacher every time; seeded
    noise gives the same one (and so could anyone who reads the config)."""
    from tests.test_files import played

    def teacher(secure: bool, run: int) -> dict[str, torch.Tensor]:
        _, state, rows, _ = played(
            tmp_path / f"{secure}{run}",
            "strategy=fedmd",
            f"privacy={mode}",
            f"privacy.secure_noise={str(secure).lower()}",
        )
        assert rows[-1]["dp_noise"] == ("os-csprng" if secure else "seeded")
        assert state.privacy.summary()["dp_noise"] == rows[-1]["dp_noise"]
        return state.strategy.server_model.state_dict()

    def same(a, b) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(teacher(False, 0), teacher(False, 1))
    assert not same(teacher(True, 0), teacher(True, 1))


@pytest.mark.parametrize("mode", ["none", "sample", "client"])
def test_dp_replies_carry_no_unaccounted_private_metric(plain_cfg, mode):
    """What a client sends under DP is what the accountant covers, and no more."""
    from flwr.app import Message, RecordDict

    from fedkd.client import handle_query
    from fedkd.local_round import client_reply
    from fedkd.privacy.release import RELEASABLE, withheld
    from fedkd.protocol import METRICS
    from fedkd.round_loop import prepare_round
    from fedkd.server_state import build_server_state

    plain = plain_cfg("strategy=fedmd", f"privacy={mode}", "lifelong=class_incremental",
                      "lifelong.num_tasks=2", "lifelong.rounds_per_task=1")  # fmt: skip
    state = build_server_state(plain, "cpu")
    state.population = list(range(state.cfg.num_clients))
    _, downloads = prepare_round(state, 1)
    pid, download = downloads[0]
    sent = dict(client_reply(plain, pid, download)[METRICS])
    query = Message(RecordDict(), dst_node_id=10 + pid, message_type="query")
    declared = handle_query(plain, query, context(pid)).content[METRICS]

    shard, task_data = len(state.data.shards[pid]), len(state.data.client_data(pid, 0)[1])
    if mode == "none":
        assert {"train-loss", "test-accuracy", "compute-seconds", "task-accuracy"} <= set(sent)
        assert (sent["num-examples"], declared["num-examples"]) == (task_data, shard)
        assert withheld(mode) == []
        return
    assert set(sent) <= RELEASABLE[mode]
    assert not {"train-loss", "compute-seconds"} & set(sent)
    if mode == "sample":  # the student is DP-trained: its test accuracy is post-processing
        assert (sent["num-examples"], declared["num-examples"]) == (task_data, shard)
        assert sent["dp-secure-noise"] == 1
        assert "test-accuracy" in sent and "dp-epsilon" in sent
    else:  # client level: nothing about the shard but the noised upload
        assert sent["num-examples"] == declared["num-examples"] == 1
        assert not {"test-accuracy", "task-accuracy"} & set(sent)
        assert "num-examples (sent as 1)" in withheld(mode)
    assert "train-loss" in withheld(mode)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_dp_sgd_has_its_own_settings_and_is_accounted_by_them(plain_cfg, optimizer):
    """privacy.batch_size/epochs/lr/optimizer drive the private steps, and the
    epsilon a client reports is the accountant's for exactly those steps."""
    from fedkd.client_runtime import client_runtime
    from fedkd.local_round import client_reply
    from fedkd.protocol import METRICS
    from fedkd.round_loop import prepare_round
    from fedkd.server_state import build_server_state

    plain = plain_cfg(
        "strategy=fedmd", "privacy=sample", "privacy.batch_size=64", "privacy.epochs=3",
        "privacy.lr=0.5", f"privacy.optimizer={optimizer}", "privacy.activation=tanh",
    )  # fmt: skip
    state = build_server_state(plain, "cpu")
    state.population = list(range(state.cfg.num_clients))
    _, downloads = prepare_round(state, 1)
    pid, download = downloads[0]
    sent = client_reply(plain, pid, download)[METRICS]
    runtime = client_runtime(plain)
    n = len(runtime.data.client_data(pid, 0)[1])
    q, steps = dp_steps_per_round(n, 64, 3)
    assert steps == 3 * round(n / 64) != dp_steps_per_round(n, 32, 1)[1]  # not train.*
    from fedkd.local_round import simulation_ledger
    from fedkd.node_ledger import Entry

    assert simulation_ledger(runtime, pid).entries() == [Entry(0, 1, q, 1.0, steps)]
    assert sent["dp-epsilon"] == pytest.approx(gaussian_epsilon(1.0, [(q, steps)], 1e-5))
    # the student trained with a bounded activation
    from fedkd.local_round import new_student

    student = new_student(plain, runtime.data, pid)
    kinds = {type(m) for m in student.modules()}
    assert torch.nn.Tanh in kinds and torch.nn.ReLU not in kinds


def test_a_bounded_activation_is_refused_for_models_whose_relus_are_inline():
    from fedkd.models import with_activation

    model = create_model("resnet8", num_classes=4, input_shape=(3, 12, 12))
    with pytest.raises(ConfigError, match=r"privacy\.activation"):
        with_activation(model, "tanh")


def test_a_replayed_round_is_counted_again_in_simulation(plain_cfg):
    """The client store keeps the newest state of a round, so a round trained twice
    (a retry, a replay after a resume) once left one round's steps in the count; the
    append-only ledger counts both (on old main: the same epsilon twice)."""
    from fedkd.local_round import client_reply
    from fedkd.protocol import METRICS
    from fedkd.round_loop import prepare_round
    from fedkd.server_state import build_server_state

    plain = plain_cfg("strategy=fedmd", "privacy=sample", "privacy.batch_size=64")
    state = build_server_state(plain, "cpu")
    state.population = list(range(state.cfg.num_clients))
    _, downloads = prepare_round(state, 1)
    pid, download = downloads[0]
    once = client_reply(plain, pid, download)[METRICS]["dp-epsilon"]
    twice = client_reply(plain, pid, download)[METRICS]["dp-epsilon"]
    assert twice > once > 0

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
from fedkd.privacy.upload import clip_rows, noisy_mean
from fedkd.results import read_metrics
from fedkd.training import LocalTraining
from tests.conftest import TINY


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


def test_noisy_mean_is_calibrated_to_one_clients_upload():
    gen = torch.Generator().manual_seed(0)
    uploads = torch.randn(4, 400, 10) * 10
    exact = clip_rows(uploads, 2.0).mean(0)
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
        results.append(dp_train_student(model, x, y, hp, DPSGD(1.0, 1.0), gen, px, tp))
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
        (
            ["privacy=sample", "lifelong=class_incremental", "lifelong.num_tasks=2",
             "lifelong.rounds_per_task=1", "mitigation=replay"],
            "mitigation",
        ),
    ],
)  # fmt: skip
def test_private_settings_that_cannot_work_are_refused(tiny_cfg, overrides, key):
    from fedkd.config import validate

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

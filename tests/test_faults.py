"""Injected faults and robust aggregation: unit level, then a real run on Ray."""

from __future__ import annotations

import json

import pytest
import torch

from fedkd import faults
from fedkd.config import FaultsConfig, FedKDConfig, typed
from fedkd.distill import coordinate_median, mean_logits, trimmed_mean
from fedkd.errors import ConfigError
from fedkd.results import read_metrics
from tests.conftest import TINY


def fault_cfg(**faults_kw) -> FedKDConfig:
    return FedKDConfig(
        seed=3, num_clients=10, faults=FaultsConfig(straggler_delay=0.0, **faults_kw)
    )


def test_fault_draws_are_seeded_and_match_their_probabilities():
    cfg = fault_cfg(client_crash_prob=0.2, straggler_prob=0.1, corrupt_prob=0.3)
    draws = [faults.round_fault(cfg, r, p) for r in range(1, 101) for p in range(50)]
    assert draws == [faults.round_fault(cfg, r, p) for r in range(1, 101) for p in range(50)]
    share = {
        k: draws.count(k) / len(draws) for k in (faults.CRASH, faults.STRAGGLE, faults.CORRUPT)
    }
    assert share[faults.CRASH] == pytest.approx(0.2, abs=0.02)
    assert share[faults.STRAGGLE] == pytest.approx(0.1, abs=0.02)
    assert share[faults.CORRUPT] == pytest.approx(0.3, abs=0.02)
    assert all(faults.round_fault(fault_cfg(), r, 0) is None for r in range(100))


def test_adversaries_are_a_fixed_seeded_fraction():
    cfg = fault_cfg(adversarial_fraction=0.2)
    assert faults.adversaries(cfg) == faults.adversaries(cfg)
    assert len(faults.adversaries(cfg)) == 2 and faults.adversaries(fault_cfg()) == set()


def test_injected_crash_raises():
    cfg = fault_cfg(client_crash_prob=1.0)
    with pytest.raises(faults.InjectedCrash):
        faults.before_round(cfg, 1, 0)


@pytest.mark.parametrize("mode", faults.ADVERSARIAL_MODES)
def test_hostile_logits_are_well_formed_but_wrong(mode):
    logits = torch.randn(20, 5, generator=torch.Generator().manual_seed(0))
    bad = faults.hostile_logits(logits, mode, seed=1)
    assert bad.shape == logits.shape and torch.isfinite(bad).all()
    assert not torch.equal(bad.argmax(1), logits.argmax(1))


def test_robust_aggregators_resist_a_hostile_minority():
    honest = torch.ones(8, 4, 3)  # 8 honest clients agree on 1.0
    hostile = torch.full((2, 4, 3), -1000.0)
    values = torch.cat([honest, hostile])
    assert torch.allclose(coordinate_median(values), torch.ones(4, 3))
    assert torch.allclose(trimmed_mean(values, 0.2), torch.ones(4, 3))
    assert mean_logits(values)[0, 0] < -100  # the mean is dragged away
    with pytest.raises(ValueError):
        trimmed_mean(values, 0.5)


def test_median_of_even_count_is_the_middle_mean():
    values = torch.tensor([1.0, 2.0, 10.0, 20.0]).reshape(4, 1, 1)
    assert coordinate_median(values).item() == pytest.approx(6.0)
    assert trimmed_mean(values, 0.25).item() == pytest.approx(6.0)


def test_bad_fault_and_aggregator_settings_are_refused(tiny_cfg):
    from fedkd.compose import validate

    bad = [
        ("faults.client_crash_prob=1.5", "faults.client_crash_prob"),
        ("faults.corrupt_mode=zeros", "faults.corrupt_mode"),
        ("faults.min_replies=4", "faults.min_replies"),
        ("strategy.aggregator=mode", "strategy.aggregator"),
    ]
    for override, key in bad:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(tiny_cfg(override))
    with pytest.raises(ConfigError, match=r"faults\.corrupt_prob"):
        validate(tiny_cfg("faults.client_crash_prob=0.6", "faults.corrupt_prob=0.6"))
    with pytest.raises(ConfigError, match=r"strategy\.weighted"):
        validate(tiny_cfg("strategy.aggregator=median", "strategy.weighted=true"))


@pytest.mark.ray
def test_crash_straggler_and_corrupt_replies_are_counted(tmp_path):
    from tests.test_simulation import fedkd_sim

    overrides = [
        *TINY,
        "num_clients=8",
        "clients_per_round=8",
        "seed=1",
        "faults.client_crash_prob=0.15",
        "faults.straggler_prob=0.15",
        "faults.straggler_delay=20",
        "faults.corrupt_prob=0.15",
        "faults.corrupt_mode=garbage",
        "simulation.round_timeout=10",
    ]
    from tests.conftest import compose_cfg

    cfg = typed(compose_cfg(*overrides))
    expected = {
        r: [faults.round_fault(cfg, r, p) for p in range(8)] for r in (1, 2)
    }  # the same draws the clients make
    kinds = [k for draws in expected.values() for k in draws]
    assert {faults.CRASH, faults.STRAGGLE, faults.CORRUPT} <= set(kinds)  # seed covers all
    run = tmp_path / "run"
    fedkd_sim(*overrides, f"hydra.run.dir={run}")
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [1, 2]
    first = expected[1]  # round 1 is exact: every honest client answers in time
    assert rows[0]["failed"] == first.count(faults.CRASH)
    assert rows[0]["late"] == first.count(faults.STRAGGLE)
    assert rows[0]["rejected"] == first.count(faults.CORRUPT)
    assert rows[0]["replies"] == first.count(None)
    # In round 2 the round-1 straggler still blocks one of the two Ray workers, so
    # honest clients may be late too; every sampled client is still accounted for.
    second = rows[1]
    assert second["clients"] == sum(second[k] for k in ("replies", "failed", "late", "rejected"))
    assert second["late"] >= expected[2].count(faults.STRAGGLE)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["failed"] == sum(r["failed"] for r in rows) and summary["rounds"] == 2

"""The audits that can fail: white-box Dirac canaries on DP-SGD, and the black-box bound.

The fault: DP-SGD's noise switched off (the real secret-noise path, patched to add
zeros) while the accountant is told sigma = 1. The honest case: the same training
with the noise on. Settings: q = 0.02 and 300 DP steps, so a canary is sampled about
6 times, and the claimed epsilon (2.56) sits below the attainable bound (4.86)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedkd.audit.canaries import DiracSettings, dirac_audit
from fedkd.audit.client import ClientRecipe
from fedkd.audit.shadows import Shadows, one_run_bound
from fedkd.privacy.dpsgd import DPSGD, dp_train_student
from fedkd.privacy.noise import DPNoise
from fedkd.training import LocalTraining


def _audit(canaries: int = 1000, guesses: int = 200) -> dict:
    """Three rounds of a client's DP-SGD with KD on the proxy set (joint schedule, the
    teacher from round 2), on a tiny model and shard."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(500, 1, 8, 8, generator=g), torch.randint(0, 4, (500,), generator=g)
    proxy_x = torch.randn(100, 1, 8, 8, generator=g)
    teacher = torch.softmax(torch.randn(100, 4, generator=g), 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 4))
    hp = LocalTraining(epochs=1, batch_size=20, lr=0.05, momentum=0.0)
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=10, epochs=2, lr=0.5)
    recipe = ClientRecipe(hp, dp, rounds=3, proxy_x=proxy_x, teacher_probs=teacher, start=None)
    return dirac_audit(model, x, y, recipe, g, DiracSettings(canaries, guesses), delta=1e-5)


def test_white_box_audit_catches_dp_sgd_without_noise(monkeypatch):
    monkeypatch.setattr(DPNoise, "normal", lambda self, shape, std: torch.zeros(shape))
    out = _audit()
    assert out["dp_steps"] == 300 and out["sample_rate"] == pytest.approx(0.02)
    assert out["accountant_epsilon"] == pytest.approx(2.56, abs=0.01)
    assert out["accountant_epsilon"] < out["attainable"]
    assert out["value"] > out["accountant_epsilon"]  # the broken claim is refuted


def test_white_box_audit_of_honest_dp_sgd_stays_below_the_accountant():
    out = _audit()
    assert out["value"] <= out["accountant_epsilon"] <= out["attainable"]
    assert out["canaries"] == 1000 and out["guesses"] == 400
    assert 0.4 * 1000 < out["included"] < 0.6 * 1000  # fair coins


def test_the_audit_hook_sees_every_step_and_changes_nothing_by_itself():
    """A hook that adds nothing leaves DP-SGD's result bit for bit as without it, and
    `observe` sees each step's noisy sum (seeded noise: replayable)."""

    class Watch:
        def __init__(self):
            self.seen = []

        def inject(self, params):
            pass

        def observe(self, params):
            self.seen.append(params[0].grad.clone())

    def train(audit):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(50, 1, 4, 4, generator=g), torch.randint(0, 3, (50,), generator=g)
        hp = LocalTraining(epochs=1, batch_size=10, lr=0.1)
        dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=10, epochs=1, lr=0.1)
        _, steps = dp_train_student(model, x, y, hp, dp, g, audit=audit)
        return [p.detach().clone() for p in model.parameters()], steps

    watch = Watch()
    plain, steps = train(None)
    watched, _ = train(watch)
    assert all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))
    assert len(watch.seen) == steps == 5
    assert all(float(s.abs().max()) > 0 for s in watch.seen)


def _shadows(effect: float, k: int = 8, c: int = 500, seed: int = 0) -> Shadows:
    """Canaries with their own difficulty (a baseline per canary) that training on
    them raises by `effect`, plus noise."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 3, c)
    canary_in = rng.random((k, c)) < 0.5
    phi = base + effect * canary_in + rng.normal(0, 0.5, (k, c))
    none = np.zeros((k, 0))
    return Shadows(none, none.astype(bool), phi, canary_in, [None] * k)


def test_black_box_bound_sees_a_leak_only_after_calibration_and_pools_the_tested_shadows():
    leak = one_run_bound(_shadows(2.0), guesses=25, delta=1e-5)
    assert leak["tested_shadows"] == leak["reference_shadows"] == 4
    assert leak["canaries"] == 4 * 500 and leak["guesses"] == 4 * 50
    assert 1.0 < leak["value"] <= leak["attainable"]
    # without calibration the per-canary difficulty (std 3) hides the same leak
    raw = _shadows(2.0)
    raw.canary_phi[:4] = 0.0  # references that tell nothing: the score is the raw phi
    assert one_run_bound(raw, guesses=25, delta=1e-5)["value"] < leak["value"] / 2
    for seed in range(5):  # nothing to see: nothing refuted
        assert one_run_bound(_shadows(0.0, seed=seed), guesses=25, delta=1e-5)["value"] < 0.3

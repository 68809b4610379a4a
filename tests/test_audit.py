"""fedkd-audit: the attack maths on known distributions, and the CLI on tiny runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from fedkd.audit.attacks import lira_scores, logit_confidence
from fedkd.audit.metrics import (
    attack_summary,
    one_run_epsilon,
    one_run_guesses,
    one_run_p_value,
    tpr_at_fpr,
)


def test_logit_confidence_is_the_log_odds_of_the_true_class():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    p = torch.softmax(logits, 1)
    expected = [float(np.log(p[0, 0] / (1 - p[0, 0]))), float(np.log(p[1, 2] / (1 - p[1, 2])))]
    assert logit_confidence(logits, torch.tensor([0, 2])) == pytest.approx(expected)
    # stable where the softmax saturates
    assert np.isfinite(logit_confidence(torch.tensor([[80.0, -80.0]]), torch.tensor([0]))).all()


def test_separable_scores_give_auc_one_and_random_ones_about_half():
    rng = np.random.default_rng(0)
    labels = np.repeat([1, 0], 500)
    perfect = attack_summary(labels, labels + 0.1 * rng.random(1000), rng, bootstrap=50)
    assert perfect["auc"] == 1.0 and perfect["tpr_at_0.01_fpr"] == 1.0
    noise = attack_summary(labels, rng.normal(size=1000), rng, bootstrap=100)
    low, high = noise["auc_ci"]
    assert low < 0.5 < high and high - low < 0.1
    assert 0.0 <= noise["tpr_at_0.01_fpr"] <= 0.05
    with pytest.raises(ValueError, match="finite"):
        attack_summary(labels, np.full(1000, np.nan), rng)


def test_tpr_at_fpr_reads_the_roc_curve():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    scores = np.array([9, 8, 1, 7, 2, 2, 1, 0, 0, 0], dtype=float)
    assert tpr_at_fpr(labels, scores, 0.0) == pytest.approx(2 / 3)  # above every non-member
    assert tpr_at_fpr(labels, scores, 1 / 7) == pytest.approx(2 / 3)
    assert tpr_at_fpr(labels, scores, 1.0) == 1.0


def test_lira_finds_members_whose_scores_shift_by_example():
    """Each example has its own baseline (hard and easy examples); membership adds
    +1. A global threshold sees mostly the baselines; LiRA, calibrated per example by
    the shadows, sees the shift."""
    rng = np.random.default_rng(1)
    m, k = 2000, 16
    base = rng.normal(0, 3, m)
    member = rng.random(m) < 0.5
    target = base + member + rng.normal(0, 0.3, m)
    shadow_in = rng.random((k, m)) < 0.5
    shadow = base + shadow_in + rng.normal(0, 0.3, (k, m))
    lira = attack_summary(member.astype(int), lira_scores(target, shadow, shadow_in), rng, 20)
    threshold = attack_summary(member.astype(int), target, rng, 20)
    assert lira["auc"] > 0.9 > 0.65 > threshold["auc"]
    # no signal: LiRA stays at chance
    flat = lira_scores(base + rng.normal(0, 0.3, m), shadow - shadow_in, shadow_in)
    assert attack_summary(member.astype(int), flat, rng, 20)["auc"] == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("true_eps", [0.5, 1.0, 2.0])
def test_one_run_bound_never_exceeds_a_known_epsilon_and_comes_close(true_eps):
    """Randomized response on m coin-flipped canaries is exactly eps-DP: guessing its
    output gets each canary right with probability e^eps / (1 + e^eps)."""
    rng = np.random.default_rng(int(true_eps * 10))
    m = 5000
    included = rng.random(m) < 0.5
    keep = rng.random(m) < np.exp(true_eps) / (1 + np.exp(true_eps))
    released = np.where(keep, included, ~included)
    scores = released + rng.random(m) * 0.1  # rank the released bits, ties broken
    r, v = one_run_guesses(included, scores, m // 2)
    bound = one_run_epsilon(m, r, v, delta=0.0)
    assert 0.7 * true_eps < bound <= true_eps
    assert one_run_epsilon(m, r, v, delta=1e-5) <= bound  # delta only weakens it


def test_one_run_p_value_is_the_randomized_response_tail():
    assert one_run_p_value(100, 10, 10, 0.0, 0.0) == pytest.approx(0.5**10)
    assert one_run_p_value(100, 10, 0, 3.0, 1e-5) == 1.0
    assert one_run_epsilon(1000, 100, 50, 1e-5) == 0.0  # chance refutes nothing
    with pytest.raises(ValueError, match="v <= r"):
        one_run_p_value(10, 5, 6, 1.0, 0.0)


def _tiny_run(tmp_path, *overrides):
    from tests.test_files import played

    plain, _, rows, out = played(tmp_path, *overrides)
    (out / "config.yaml").write_text(yaml.safe_dump(plain))  # as fedkd-sim writes them
    (out / "summary.json").write_text(json.dumps({"epsilon": rows[-1].get("epsilon")}))
    return out


FAST = ["--candidates", "40", "--shadows", "2", "--shadow-rounds", "1", "--surrogate-epochs",
        "1", "--canaries", "20", "--guesses", "2", "--dirac-canaries", "200", "--dirac-guesses",
        "20"]  # fmt: skip


@pytest.mark.parametrize(
    "overrides, view",
    [
        (("strategy=fedavg",), "weights"),
        (("strategy=dsfl", "strategy.codec=onebit"), "soft labels (onebit)"),
        (("strategy=fedmd", "privacy=sample", "privacy.noise_multiplier=2.0"), "soft labels"),
        # client-level DP: the server adds the noise, so it sees the clipped uploads
        (("strategy=dsfl", "privacy=client"), "soft labels (float16), clipped, not noised"),
    ],
)
def test_fedkd_audit_attacks_what_the_server_saw(tmp_path, capsys, overrides, view):
    from simulations.audit import main

    run = _tiny_run(tmp_path, *overrides)
    main([str(run), *FAST])
    result = json.loads((run / "audit.json").read_text())
    assert result["view"].startswith(view)
    assert result["members"] == result["non_members"] > 0
    for attack in ("threshold", "lira"):
        a = result["attacks"][attack]
        assert 0.0 <= a["auc_ci"][0] <= a["auc"] <= a["auc_ci"][1] <= 1.0
    bound = result["epsilon_lower_bound"]
    assert 0 <= bound["value"] <= bound["attainable"] and bound["guesses"] <= bound["canaries"]
    printed = capsys.readouterr().out
    assert "TPR @ 1% FPR" in printed and f"attainable {bound['attainable']:.2f}" in printed
    if "privacy=sample" in overrides:  # the white-box audit of DP-SGD comes first
        assert result["privacy"] == "sample" and result["epsilon"] > 0
        assert bound["audit"].startswith("white-box") and bound["canaries"] == 200
        assert bound["value"] <= bound["accountant_epsilon"]  # never beats the accountant
        black = result["black_box_lower_bound"]
        assert black["audit"].startswith("black-box") and black["canaries"] == 20
        assert black["value"] <= black["accountant_epsilon"]
    else:
        assert bound["audit"].startswith("black-box") and bound["accountant_epsilon"] is None
        assert "black_box_lower_bound" not in result
        assert bound["canaries"] == 20 and bound["guesses"] == 4  # one tested shadow


@pytest.mark.parametrize(
    "overrides, args, message",
    [
        ((), ["--client", "7"], "--client"),
        ((), ["--white-box-only"], "privacy=sample"),
        (("strategy=local",), [], "strategy"),
        (("lifelong=class_incremental", "lifelong.num_tasks=2", "lifelong.rounds_per_task=1"),
         [], "lifelong"),
    ],
)  # fmt: skip
def test_fedkd_audit_refuses_what_it_cannot_audit_in_one_line(
    tmp_path, capsys, overrides, args, message
):
    from simulations.audit import main

    run = _tiny_run(tmp_path, *overrides)
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("fedkd-audit: error:") and message in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shadows", "1"], "--shadows=1 is not allowed: >= 2"),
        (["--canaries", "10", "--guesses", "6"], "--guesses=6 is not allowed: at most half"),
        (["--dirac-guesses", "2501"], "--dirac-guesses=2501 is not allowed: at most half"),
        (["--shadow-rounds", "0"], "--shadow-rounds=0 is not allowed: >= 1"),
        (["--candidates", "5"], "--candidates=5"),
        (["--guesses", "x"], "--guesses: invalid int value"),
    ],
)
def test_fedkd_audit_bad_options_are_one_line_before_any_work(tmp_path, capsys, args, message):
    from simulations.audit import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), *args])  # not even a run: the options are checked first
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and message in err[-1] and "fedkd-audit: error:" in err[-1]


def test_fedkd_audit_of_a_directory_that_is_no_run_is_one_line(tmp_path, capsys):
    from simulations.audit import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2 and "no config.yaml" in capsys.readouterr().err

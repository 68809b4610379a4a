"""Continual-learning metrics on hand-computed matrices, and their round-by-round tracking."""

from __future__ import annotations

import math

import pytest

from fedkd.lifelong import (
    LifelongTracker,
    avg_accuracy,
    bwt,
    forgetting,
    forgetting_last,
    fwt,
    metrics_at,
)

R = [
    [0.90, 0.10, 0.00],
    [0.95, 0.80, 0.20],
    [0.50, 0.70, 0.90],
]
B = [0.10, 0.05, 0.10]


def test_average_accuracy():
    assert avg_accuracy(R, 0) == pytest.approx(0.90)
    assert avg_accuracy(R, 1) == pytest.approx((0.95 + 0.80) / 2)
    assert avg_accuracy(R, 2) == pytest.approx((0.50 + 0.70 + 0.90) / 3)


def test_forgetting_max_based_versus_last():
    # task 0 peaked after task 1 (0.95), so the max-based variant counts from there
    assert forgetting(R, 2) == pytest.approx(((0.95 - 0.50) + (0.80 - 0.70)) / 2)
    assert forgetting_last(R, 2) == pytest.approx(((0.90 - 0.50) + (0.80 - 0.70)) / 2)
    # improving on an old task is negative forgetting
    assert forgetting(R, 1) == pytest.approx(0.90 - 0.95)
    assert forgetting_last(R, 1) == pytest.approx(0.90 - 0.95)


def test_backward_and_forward_transfer():
    assert bwt(R) == pytest.approx(((0.50 - 0.90) + (0.70 - 0.80)) / 2)
    assert fwt(R, B) == pytest.approx(((0.10 - 0.05) + (0.20 - 0.10)) / 2)


def test_one_task_has_no_forgetting_or_transfer():
    one = [[0.8]]
    assert avg_accuracy(one, 0) == pytest.approx(0.8)
    assert forgetting(one, 0) is None and forgetting_last(one, 0) is None
    assert bwt(one) is None and fwt(one, [0.1]) is None
    assert metrics_at(one, 0, [0.1]) == {
        "avg_accuracy": pytest.approx(0.8),
        "forgetting": None,
        "forgetting_last": None,
        "bwt": None,
        "fwt": None,
    }


def test_tasks_not_yet_seen_are_ignored():
    nan = math.nan
    partial = [[0.9, 0.0, 0.0], [0.7, 0.8, 0.0], [nan, nan, nan]]
    m = metrics_at(partial, 1, B)
    assert m["avg_accuracy"] == pytest.approx(0.75)
    assert m["forgetting"] == pytest.approx(0.2)
    assert m["bwt"] is None and m["fwt"] is None  # only defined after the last task


def test_ties_and_unchanged_accuracy_give_zero_forgetting():
    flat = [[0.6, 0.0], [0.6, 0.6]]
    assert forgetting(flat, 1) == 0 and forgetting_last(flat, 1) == 0 and bwt(flat) == 0
    tied_peak = [[0.7, 0.1, 0.0], [0.7, 0.9, 0.0], [0.4, 0.9, 0.5]]
    assert forgetting(tied_peak, 2) == pytest.approx((0.3 + 0.0) / 2)


def test_tracker_fills_rows_at_task_ends_only():
    t = LifelongTracker(2)
    t.baseline = [0.5, 0.5]
    r1 = t.round(0, [0.6, 0.1], task_end=False)
    assert r1["task_accuracy"] == [0.6, 0.1] and r1["forgetting"] is None
    assert r1["accuracy_matrix"] == [[0.6, 0.1], [None, None]]
    t.round(0, [0.9, 0.2], task_end=True)
    r3 = t.round(1, [0.5, 0.7], task_end=False)
    assert r3["forgetting"] == pytest.approx(0.4) and r3["bwt"] == pytest.approx(-0.4)
    t.round(1, [0.6, 0.8], task_end=True)
    final = t.final()
    assert final["accuracy_matrix"] == [[0.9, 0.2], [0.6, 0.8]]
    assert final["forgetting"] == pytest.approx(0.3)
    assert final["bwt"] == pytest.approx(-0.3)
    assert final["fwt"] == pytest.approx(0.2 - 0.5)
    assert final["avg_accuracy"] == pytest.approx(0.7)


def test_student_tracker_prefixes_keys_and_tolerates_missing_rows():
    t = LifelongTracker(2, "student_")
    assert t.round(0, None, task_end=False) == {"student_task_accuracy": None}
    assert "student_forgetting" in t.round(1, [0.5, 0.5], task_end=True)

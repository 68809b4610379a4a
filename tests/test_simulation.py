"""Real Flower simulations on Ray, through the `fedkd-sim` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedkd.results import REQUIRED_FIELDS, TIMING_FIELDS, read_metrics
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.ray


def fedkd_sim(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "simulations.run", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def test_dsfl_run_writes_every_output_and_is_deterministic(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        proc = fedkd_sim(*TINY, "strategy=dsfl", f"hydra.run.dir={run}")
    a, b = (read_metrics(r) for r in runs)
    assert len(a) == 2
    for row in a:
        assert set(REQUIRED_FIELDS) <= set(row)
        assert row["clients"] == 3 and row["replies"] == 3 and row["rejected"] == 0
    assert a[0]["bytes_down"] == 0 and a[1]["bytes_down"] > 0  # round 1 has no teacher yet
    assert a[0]["bytes_up"] > 0
    assert without_timing(a) == without_timing(b)  # same config + seed => same metrics

    run = runs[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["strategy"] == "dsfl"
    assert summary["ray_nodes"] == 1  # a local Ray instance: one node
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in a)
    assert summary["teacher_accuracy"] == a[-1]["teacher_accuracy"]
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["num_clients"] == 3 and resolved["simulation"]["num_gpus"] == 0.0
    assert (run / "plots" / "accuracy.png").stat().st_size > 0
    assert (run / "plots" / "bytes.png").stat().st_size > 0
    # the progress display prints one line per round; Ray's own log lines stay hidden
    assert "2/2" in proc.stderr and "Started a local Ray instance" not in proc.stderr + proc.stdout


def test_cohort_execution_gives_the_per_client_numbers_and_is_deterministic(tmp_path):
    """fedkd/cohort.py: 6 clients on 2 simulated nodes, dsfl and fedavg; the same
    metrics as a node per client, and the same on a second cohort run."""
    tiny = [a for a in TINY if not a.startswith(("num_clients", "clients_per_round"))]
    args = [*tiny, "num_clients=6", "clients_per_round=4", "simulation.cohort_nodes=2"]
    for name, mode in (("cohort", "cohort"), ("again", "cohort"), ("single", "per_client")):
        sweep = tmp_path / name
        fedkd_sim(
            "-m",
            *args,
            "strategy=dsfl,fedavg",
            f"simulation.execution={mode}",
            f"hydra.sweep.dir={sweep}",
            timeout=600,
        )
    for strategy in ("dsfl", "fedavg"):
        runs = [next((tmp_path / n).glob(f"*_{strategy}_*")) for n in ("cohort", "again", "single")]
        rows = [without_timing(read_metrics(r)) for r in runs]
        assert rows[0] == rows[1] == rows[2]
        assert [r["replies"] for r in rows[0]] == [4, 4]
        executions = [json.loads((r / "summary.json").read_text())["execution"] for r in runs]
        assert executions == ["cohort", "cohort", "per_client"]


def test_every_strategy_runs_in_one_multirun(tmp_path):
    fedkd_sim(
        "-m",
        *TINY,
        "strategy=fedmd,feddf,fedavg,local,central",
        f"hydra.sweep.dir={tmp_path}",
        timeout=600,
    )
    summaries = {
        s["strategy"]: s
        for s in (json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json"))
    }
    assert set(summaries) == {"fedmd", "feddf", "fedavg", "local", "central"}
    assert summaries["local"]["bytes_up"] == summaries["local"]["bytes_down"] == 0
    assert summaries["local"]["teacher_accuracy"] is None
    assert summaries["central"]["client_accuracy_mean"] is None
    assert summaries["central"]["teacher_accuracy"] > 0.5
    assert summaries["fedavg"]["bytes_up"] > summaries["fedmd"]["bytes_up"]


def test_lifelong_run_records_the_accuracy_matrix_and_forgetting(tmp_path):
    run = tmp_path / "ll"
    fedkd_sim(
        *TINY,
        "rounds=4",
        "lifelong=class_incremental",
        "lifelong.num_tasks=2",
        "lifelong.rounds_per_task=2",
        "lifelong.proxy=drifting",
        "mitigation=teacher_memory",
        "partition=iid",
        f"hydra.run.dir={run}",
    )
    rows = read_metrics(run)
    assert [r["task"] for r in rows] == [0, 0, 1, 1]
    assert all(len(r["task_accuracy"]) == 2 and len(r["student_task_accuracy"]) == 2 for r in rows)
    assert rows[0]["forgetting"] is None and rows[-1]["forgetting"] is not None
    summary = json.loads((run / "summary.json").read_text())
    R = summary["accuracy_matrix"]
    assert (
        len(R) == 2 and R[0][0] == rows[1]["task_accuracy"][0] and R[1] == rows[3]["task_accuracy"]
    )
    for key in (
        "avg_accuracy",
        "forgetting",
        "forgetting_last",
        "bwt",
        "fwt",
        "student_forgetting",
    ):
        assert summary[key] is not None, key
    assert summary["mitigation"] == "teacher_memory" and summary["num_tasks"] == 2
    for name in ("accuracy_matrix.png", "task_accuracy.png", "student_task_accuracy.png"):
        assert (run / "plots" / name).stat().st_size > 0


@pytest.mark.parametrize("source", ["bank", "synthetic"])
def test_student_memory_run_reports_the_students_accuracy_matrix(tmp_path, source):
    run = tmp_path / source
    fedkd_sim(
        *TINY,
        "rounds=6",
        "lifelong=class_incremental",
        "lifelong.num_tasks=3",
        "lifelong.rounds_per_task=2",
        "lifelong.proxy=drifting",
        "partition=iid",
        "mitigation=student_memory",
        f"mitigation.source={source}",
        "mitigation.student_items=20",
        "mitigation.synthetic_items=40",
        "mitigation.synthesis_steps=5",
        f"hydra.run.dir={run}",
    )
    summary = json.loads((run / "summary.json").read_text())
    S = summary["student_accuracy_matrix"]
    assert len(S) == 3 and all(len(row) == 3 for row in S)
    assert all(S[i][j] is not None for i in range(3) for j in range(i + 1))  # every seen task
    assert summary["student_avg_accuracy"] is not None and summary["student_forgetting"] is not None
    down = [r["bytes_down"] for r in read_metrics(run)]
    if source == "synthetic":  # 3 clients x 20 inputs (>= 100 values each) + labels, float16
        assert down[2] - down[1] > 3 * 20 * (100 + 10) * 2 and down[4] > down[2]
    else:  # the bank costs no bytes
        assert down[4] - down[1] < 1000

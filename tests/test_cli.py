"""Bad input at the command line: one line on stderr, exit code 2, no run left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def fedkd_sim(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "simulations.run", *args, f"hydra.run.dir={run_dir}"]
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["strategy=nope"], "strategy='nope' is not allowed: one of central, dsfl"),
        (["model.student=vgg99"], "model.student='vgg99'"),
        (["dataset.name=mnist"], "dataset.name='mnist'"),
        (["dataset=nope"], "dataset='nope' is not allowed"),
        (["partition.alpha=0"], "partition.alpha=0"),
        (["partition.alpha=-0.5"], "partition.alpha=-0.5"),
        (["distill.temperature=0"], "distill.temperature=0"),
        (["clients_per_round=20"], "clients_per_round=20"),
        (["rounds=abc"], "rounds"),
        (["no_such_key=1"], "no_such_key"),
        (["experiment=smoke", "proxy.size=5000"], "proxy.size=5000"),
        (["experiment=smoke", "num_clients=5000", "clients_per_round=2"], "num_clients=5000"),
        (["dataset=cifar10", "dataset.root=/nonexistent"], "cifar10"),
        (["lifelong=class_incremental", "lifelong.num_tasks=11"], "lifelong.num_tasks=11"),
        (
            ["lifelong=class_incremental", "lifelong.rounds_per_task=5"],
            "lifelong.rounds_per_task=5",
        ),
        (
            ["lifelong=class_incremental", "mitigation=dream"],
            "mitigation='dream' is not allowed: one of client_lwf, none, replay",
        ),
        (
            [
                "experiment=smoke",
                "rounds=10",
                "lifelong=class_incremental",
                "lifelong.rounds_per_task=2",
                "lifelong.task_classes=[[0,1],[],[2],[3],[4]]",
            ],
            "lifelong.task_classes",
        ),
        (
            ["strategy=local", "mitigation=teacher_memory"],
            "mitigation='teacher_memory'",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, needle):
    proc = fedkd_sim(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fedkd-sim: error: ")
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()

"""Checkpoint and resume: a run killed with SIGKILL mid-round and resumed with
`fedkd-resume` ends with the metrics of a run that was never interrupted."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedkd.results import read_metrics
from tests.conftest import TINY
from tests.test_simulation import ROOT, fedkd_sim, without_timing

# A lifelong run with a server-side memory: the checkpoint must carry the teacher,
# its optimizer, the mitigation's memory and the accuracy matrices.
SETTING = (
    *TINY,
    "rounds=4",
    "num_clients=4",
    "clients_per_round=3",
    "lifelong=class_incremental",
    "lifelong.num_tasks=2",
    "lifelong.rounds_per_task=2",
    "mitigation=teacher_memory",
    "mitigation.memory_size=50",
    # stragglers (no timeout: they only slow rounds down) so the kill lands mid-round
    "faults.straggler_prob=0.4",
    "faults.straggler_delay=1.5",
)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started (Ray's processes included)."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)


def resume(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simulations.resume", str(run)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.ray
def test_sigkill_mid_round_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    fedkd_sim(*SETTING, f"hydra.run.dir={reference}")

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "simulations.run", *SETTING, f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            break  # round 2 is recorded (and a task boundary passed): round 3 is starting
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    time.sleep(0.5)  # into round 3
    kill_tree(proc.pid)
    assert not (run / "summary.json").exists()
    assert 2 <= len(read_metrics(run)) < 4  # killed in round 3 or 4: rounds are left to play

    done = resume(run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert without_timing(read_metrics(run)) == without_timing(read_metrics(reference))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (run, reference))
    for key in ("teacher_accuracy", "accuracy_matrix", "forgetting", "bytes_up", "rounds"):
        assert a[key] == b[key], key

    again = resume(run)  # a finished run cannot be resumed
    assert again.returncode == 2 and "already finished" in again.stderr

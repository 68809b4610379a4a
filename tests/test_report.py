"""`fedkd-report` on crafted run directories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from simulations.report import ReportError, report

ROOT = Path(__file__).resolve().parent.parent


def make_run(root: Path, name: str, strategy: str, seed: int, acc: float, **config) -> Path:
    run = root / name
    run.mkdir(parents=True)
    summary = {
        "strategy": strategy,
        "seed": seed,
        "teacher_accuracy": acc,
        "client_accuracy_mean": acc - 0.1,
        "bytes_up": 2_000_000,
        "bytes_down": 1_000_000,
        "bytes_up_per_round": 100_000.0,
        "bytes_down_per_round": 50_000.0,
        "wall_seconds": 10.0,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    cfg = {
        "seed": seed,
        "rounds": 20,
        "strategy": {"name": strategy},
        "simulation": {"client_state_dir": str(run)},
    }
    cfg.update(config)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def test_mean_and_std_over_seeds(tmp_path):
    make_run(tmp_path, "a", "dsfl", 0, 0.80)
    make_run(tmp_path, "b", "dsfl", 1, 0.82)
    make_run(tmp_path, "c", "fedavg", 0, 0.88)
    md = report([str(tmp_path)], str(tmp_path / "out"))
    dsfl = next(line for line in md.splitlines() if line.startswith("| dsfl"))
    assert "| 2 |" in dsfl and "81.0 ± 1.4" in dsfl
    assert "88.0" in next(line for line in md.splitlines() if line.startswith("| fedavg"))
    assert (tmp_path / "out" / "table.csv").read_text().splitlines()[0].startswith("group,seeds")


def test_mixed_settings_are_refused(tmp_path):
    make_run(tmp_path, "a", "dsfl", 0, 0.8)
    make_run(tmp_path, "b", "dsfl", 1, 0.8, rounds=5)
    with pytest.raises(ReportError, match="different settings are mixed: rounds"):
        report([str(tmp_path)], None)


def test_no_runs_is_an_error_on_the_command_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.report", str(tmp_path / "empty")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("fedkd-report: error: no finished runs")
    assert "Traceback" not in proc.stderr

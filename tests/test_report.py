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


def test_a_strategy_configs_own_settings_compare_but_an_override_does_not(tmp_path):
    # conf/strategy/dsfl.yaml sets DS-FL's server step; fedavg keeps the global one
    make_run(tmp_path, "a", "dsfl", 0, 0.8)
    make_run(tmp_path, "b", "fedavg", 0, 0.9)
    assert "| dsfl |" in report([str(tmp_path)], None)
    make_run(tmp_path, "c", "dsfl", 1, 0.8, distill={"server_lr": 0.05})
    with pytest.raises(ReportError, match=r"distill\.server_lr"):
        report([str(tmp_path)], None)


def test_whether_client_files_were_kept_is_no_setting_to_compare(tmp_path):
    make_run(tmp_path, "a", "dsfl", 0, 0.80)
    make_run(tmp_path, "b", "dsfl", 1, 0.82)
    make_run(tmp_path, "c", "dsfl", 2, 0.84)
    for name, keep in (("a", True), ("b", False)):  # c: a run from before the key
        cfg = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        cfg["simulation"]["keep_client_state"] = keep
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert "| dsfl | 3 | 82.0 ± 2.0" in report([str(tmp_path)], None)


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


def write_rounds(run: Path, accs: list[float], bytes_per_round: int) -> None:
    rows = [
        {"round": i + 1, "teacher_accuracy": a, "bytes_up": bytes_per_round, "bytes_down": 0}
        for i, a in enumerate(accs)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_vary_names_rows_and_target_counts_rounds_and_bytes(tmp_path):
    a = make_run(tmp_path, "a", "dsfl", 0, 0.8, proxy={"subset_size": 1000})
    a_cfg = yaml.safe_load((a / "config.yaml").read_text())
    a_cfg["strategy"]["codec"] = "int8"
    (a / "config.yaml").write_text(yaml.safe_dump(a_cfg))
    b = make_run(tmp_path, "b", "fedavg", 0, 0.9, proxy={"subset_size": None})
    c = make_run(tmp_path, "c", "dsfl", 0, 0.8, proxy={"subset_size": None})
    c_cfg = yaml.safe_load((c / "config.yaml").read_text())
    c_cfg["strategy"]["codec"] = "float16"
    (c / "config.yaml").write_text(yaml.safe_dump(c_cfg))
    write_rounds(a, [0.5, 0.7, 0.81], 1_000_000)
    write_rounds(b, [0.6, 0.79], 8_000_000)
    write_rounds(c, [0.85], 2_000_000)
    with pytest.raises(ReportError, match=r"--vary proxy\.subset_size"):
        report([str(tmp_path)], None)
    md = report([str(tmp_path)], None, vary=("proxy.subset_size",), target=0.8)
    lines = md.splitlines()
    assert "rounds to 80%" in lines[0] and "MB to 80%" in lines[0]
    dsfl = next(line for line in lines if line.startswith("| dsfl"))
    assert dsfl.startswith("| dsfl subset_size=1000 codec=int8 |")
    assert "| 3.0 | 3.000 |" in dsfl  # reached 0.81 in round 3 after 3 x 1 MB
    assert any(line.startswith("| dsfl subset_size=None codec=float16 |") for line in lines)
    fedavg = next(line for line in lines if line.startswith("| fedavg"))
    assert fedavg.startswith("| fedavg subset_size=None |")  # fedavg has no codec
    assert "| - | - |" in fedavg  # never reached 80%


def test_private_runs_get_an_epsilon_column_and_are_named_by_noise(tmp_path):
    for i, (sigma, eps) in enumerate([(0.5, 8.25), (1.0, 2.5)]):
        run = make_run(tmp_path, f"r{i}", "dsfl", 0, 0.8, privacy={"noise_multiplier": sigma})
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps(summary | {"epsilon": eps}))
    md = report([str(tmp_path)], None, vary=("privacy",))
    lines = md.splitlines()
    assert "| epsilon |" in lines[0]
    assert any(line.startswith("| dsfl noise_multiplier=0.5 | 1 | 80.0 | 8.25 |") for line in lines)


def test_a_setting_added_later_takes_its_default_in_older_runs(tmp_path):
    make_run(tmp_path, "old", "dsfl", 0, 0.80)  # made before strategy.download_size existed
    for name, seed, acc, size in (("new", 1, 0.82, None), ("sub", 2, 0.70, 10)):
        run = make_run(tmp_path, name, "dsfl", seed, acc)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["strategy"]["download_size"] = size
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    md = report([str(tmp_path)], None, ("strategy.download_size",))
    rows = sorted(line for line in md.splitlines() if line.startswith("| dsfl"))
    assert len(rows) == 2
    assert rows[0].startswith("| dsfl download_size=10 | 1 |")
    assert rows[1].startswith("| dsfl download_size=None | 2 |") and "81.0 ± 1.4" in rows[1]


def test_lifelong_runs_get_server_and_student_accuracy_matrices(tmp_path):
    for seed in (0, 1):
        run = make_run(tmp_path / "runs", f"s{seed}", "dsfl", seed, 0.8)
        summary = json.loads((run / "summary.json").read_text())
        summary |= {
            "num_tasks": 2,
            "mitigation": "student_memory",
            "accuracy_matrix": [[0.9, None], [0.8, 0.9]],
            "student_accuracy_matrix": [[0.7, None], [0.5 + 0.1 * seed, 0.8]],
        }
        (run / "summary.json").write_text(json.dumps(summary))
    report([str(tmp_path / "runs")], str(tmp_path / "out"))
    for name in ("matrix_dsfl_student_memory.png", "student_matrix_dsfl_student_memory.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_a_table_names_the_commits_and_cpus_its_runs_came_from():
    from types import SimpleNamespace

    from fedkd.results.provenance import provenance
    from simulations.report import produced_by

    mine = provenance()
    assert mine["cpu"] and mine["cpu_capability"]
    runs = [
        SimpleNamespace(summary={"provenance": {"commit": "abc", "cpu": "Xeon"}}),
        SimpleNamespace(summary={"provenance": {"commit": "def", "cpu": "Xeon"}}),
        SimpleNamespace(summary={}),  # recorded before provenance existed
    ]
    assert produced_by(runs) == "\nProduced by commit abc, def, unknown on Xeon; unknown.\n"

"""Bad files: corrupt datasets, unusable checkpoints and run directories. Each fails
with one clear error naming the file, before anything is written or lost (the
config battery is in test_cli.py)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fedkd.checkpoint import CHECKPOINT, config_digest
from fedkd.errors import FedKDError
from tests.conftest import TINY, compose_cfg

ROOT = Path(__file__).resolve().parent.parent


def write_idx(path: Path, magic: bytes, dims: list[int], payload: bytes) -> None:
    header = magic + b"".join(d.to_bytes(4, "big") for d in dims)
    with gzip.open(path.with_suffix(".gz") if path.suffix != ".gz" else path, "wb") as f:
        f.write(header + payload)


def fmnist_dir(tmp_path: Path, case: str) -> Path:
    """A dataset.root holding a broken Fashion-MNIST of the given kind."""
    root = tmp_path / case
    root.mkdir()
    n = 20
    images, labels = root / "train-images-idx3-ubyte.gz", root / "train-labels-idx1-ubyte.gz"
    t_images, t_labels = root / "t10k-images-idx3-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz"
    good_images = (b"\x00\x00\x08\x03", [n, 28, 28], bytes(n * 784))
    good_labels = (b"\x00\x00\x08\x01", [n], bytes(n))
    for path, spec in ((images, good_images), (labels, good_labels)):
        write_idx(path, *spec)
    for path, spec in ((t_images, good_images), (t_labels, good_labels)):
        write_idx(path, *spec)
    if case == "bad-magic":
        write_idx(images, b"\x12\x34\x56\x78", [n, 28, 28], bytes(n * 784))
    elif case == "truncated":
        write_idx(images, b"\x00\x00\x08\x03", [n, 28, 28], bytes(100))
    elif case == "count-mismatch":
        write_idx(labels, b"\x00\x00\x08\x01", [n - 3], bytes(n - 3))
    elif case == "bad-labels":
        write_idx(labels, b"\x00\x00\x08\x01", [n], bytes([42]) * n)
    elif case == "not-gzip":
        images.write_bytes(b"this is not a gzip file")
    return root


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("bad-magic", "bad magic number"),
        ("truncated", "is corrupt: header says"),
        ("count-mismatch", "labels"),
        ("bad-labels", "above 9"),
        ("not-gzip", "cannot read"),
    ],
)
def test_corrupt_fashion_mnist_files(tmp_path, case, needle):
    from fedkd.data.datasets import load_fashion_mnist

    root = fmnist_dir(tmp_path, case)
    with pytest.raises(FedKDError, match=needle) as err:
        load_fashion_mnist(str(root), download=False)
    assert "\n" not in str(err.value)


def make_run_dir(tmp_path: Path, *overrides: str) -> tuple[Path, dict]:
    """A run directory as fedkd-sim leaves it after round 1 of 2 (no Ray needed)."""
    from fedkd.compose import to_plain

    run = tmp_path / "run"
    run.mkdir()
    plain = to_plain(compose_cfg(*TINY, *overrides))
    plain["simulation"]["client_state_dir"] = str(run / "client_state")
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(plain)))
    (run / "metrics.jsonl").write_text(json.dumps({"round": 1, "elapsed_seconds": 1.0}) + "\n")
    return run, plain


def resume_cli(run: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "simulations.resume", str(run)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def break_checkpoint(run: Path, plain: dict, case: str) -> None:
    if case == "missing":
        return
    if case == "garbage":
        (run / CHECKPOINT).write_bytes(b"\x00not a checkpoint" * 10)
    elif case == "not-fedkd":
        torch.save({"weights": torch.zeros(2)}, run / CHECKPOINT)
    elif case == "other-config":
        other = {**plain, "seed": plain["seed"] + 1}
        torch.save({"round": 1, "config_digest": config_digest(other)}, run / CHECKPOINT)
    elif case == "finished":
        torch.save({"round": 2, "config_digest": config_digest(plain)}, run / CHECKPOINT)
        (run / "summary.json").write_text("{}")
    elif case == "bad-config":
        (run / "config.yaml").write_text("rounds: [unclosed\n")
    elif case == "no-config":
        (run / "config.yaml").unlink()


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing", "no checkpoint"),
        ("garbage", "unreadable checkpoint"),
        ("not-fedkd", "not a fedkd checkpoint"),
        ("other-config", "other settings"),
        ("finished", "already finished"),
        ("bad-config", "not a valid fedkd config"),
        ("no-config", "not a fedkd run directory"),
    ],
)
def test_unusable_checkpoints_and_run_dirs_are_refused_and_left_alone(tmp_path, case, needle):
    from simulations.resume import resume

    run, plain = make_run_dir(tmp_path)
    break_checkpoint(run, plain, case)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(FedKDError, match=needle) as err:
        resume(run)
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_resume_on_the_command_line_is_one_line_and_exit_code_2(tmp_path):
    run, plain = make_run_dir(tmp_path)
    break_checkpoint(run, plain, "garbage")
    proc = resume_cli(run)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedkd-resume: error: ")
    assert "unreadable checkpoint" in lines[0]


def test_report_on_a_malformed_summary_names_the_run(tmp_path):
    from simulations.report import ReportError, report

    run = tmp_path / "r"
    run.mkdir()
    (run / "summary.json").write_text("{not json")
    (run / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ReportError, match="unreadable results"):
        report([str(tmp_path)], None)


def test_bench_summarize_without_results(tmp_path):
    from simulations.bench import summarize

    with pytest.raises(FedKDError, match="no benchmark results"):
        summarize(str(tmp_path), None)


def tree(run: Path) -> dict[str, bytes | None]:
    """Every path under `run` (folders too) and each file's bytes."""
    paths = run.rglob("*")
    return {str(p.relative_to(run)): p.read_bytes() if p.is_file() else None for p in paths}


def fedkd_sim_cli(run: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "simulations.run", *TINY, *overrides, f"hydra.run.dir={run}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)


@pytest.mark.parametrize("held", ["metrics.jsonl", CHECKPOINT, "summary.json"])
def test_a_new_run_into_a_directory_holding_a_run_is_refused_unless_overwrite(tmp_path, held):
    from fedkd.simulation import prepare

    run = tmp_path / "run"
    run.mkdir()
    (run / held).write_text("an earlier run's")
    (run / "client_state").mkdir()
    before = tree(run)
    with pytest.raises(FedKDError, match="already holds a run") as err:
        prepare(compose_cfg(*TINY), run)
    assert "\n" not in str(err.value) and "output.overwrite=true" in str(err.value)
    assert tree(run) == before
    prepare(compose_cfg(*TINY, "output.overwrite=true"), run)  # told to: the old results go
    assert not (run / held).exists()


def test_fedkd_sim_into_an_existing_run_is_one_line_exit_2_and_touches_nothing(tmp_path):
    run, _ = make_run_dir(tmp_path)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("the earlier run's composed config\n")
    before = tree(run)
    proc = fedkd_sim_cli(run)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("fedkd-sim: error: ") and "already holds a run" in lines[0]
    assert tree(run) == before  # not even Hydra's .hydra/ files or log


def test_a_failed_run_never_deletes_a_directory_that_was_there_before(tmp_path):
    run = tmp_path / "run"
    (run / "client_state").mkdir(parents=True)
    (run / "config.yaml").write_text("someone's config\n")
    (run / "client_state" / "client_000000.pt").write_bytes(b"someone's state")
    proc = fedkd_sim_cli(run, "dataset=cifar10", "dataset.root=/nonexistent")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (run / "config.yaml").read_text() == "someone's config\n"
    assert (run / "client_state" / "client_000000.pt").read_bytes() == b"someone's state"

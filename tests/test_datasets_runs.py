"""`fedkd-sim` on the new datasets, written in their real formats in tmp_path: real
runs on Ray (2 rounds each, one lifelong), and bad input as one line with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedkd.results import read_metrics
from tests import dataset_files as files
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parent.parent
SMALL = ("experiment=smoke", "rounds=2", "proxy.size=60", "distill.server_epochs=1")


def fedkd_sim(tmp_path: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = os.environ | {
        "PYTHONWARNINGS": "ignore",
        "FEDKD_CACHE": str(tmp_path / "cache"),
        "HF_HOME": str(tmp_path / "hf"),
    }
    cmd = [sys.executable, "-m", "simulations.run", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def run_ok(tmp_path: Path, *args: str) -> list[dict]:
    run = tmp_path / "run"
    proc = fedkd_sim(tmp_path, *SMALL, *args, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(run)


def natural_args(root: Path) -> tuple[str, ...]:
    return (
        "dataset=hf",
        f"dataset.path={root}",
        "dataset.owner_key=writer",
        "partition=natural",
        f"num_clients={files.WRITERS}",
        f"clients_per_round={files.WRITERS}",
    )


@pytest.mark.ray
def test_save_to_disk_dataset_runs_with_one_client_per_writer(tmp_path, monkeypatch):
    root = files.write_hf(tmp_path / "data")
    rows = run_ok(tmp_path, *natural_args(root))
    assert len(rows) == 2 and all(r["clients"] == files.WRITERS for r in rows)
    assert all(r["replies"] == files.WRITERS for r in rows)
    assert 0 <= rows[-1]["teacher_accuracy"] <= 1
    # the run's cut, rebuilt from the same config: client i holds writer i's private samples
    from fedkd.data import datasets as ds
    from fedkd.data import hf, shards
    from fedkd.data.federated import build_federated_data

    for module in (ds, hf, shards):
        monkeypatch.setattr(module, "CACHE_DIR", tmp_path / "cache")
    cfg = compose_cfg(*SMALL, *natural_args(root))
    data = build_federated_data(OmegaConf.to_container(cfg, resolve=True))
    owner = data.splits.train.owner
    for client, shard in enumerate(data.shards):
        rows_of_writer = np.setdiff1d(np.flatnonzero(owner == client), data.proxy_index)
        assert np.array_equal(np.sort(data.private_index[shard]), rows_of_writer)
        assert data.splits.owner_names[client] == f"w{client}"


@pytest.mark.ray
def test_image_folder_runs(tmp_path):
    root = files.write_folder(tmp_path / "data", channels=3)
    rows = run_ok(tmp_path, "dataset=folder", f"dataset.path={root}", "partition=iid")
    assert len(rows) == 2 and rows[-1]["replies"] == 3


@pytest.mark.ray
def test_cifar_pickle_directory_runs(tmp_path):
    files.write_cifar(tmp_path / "cifar")
    rows = run_ok(tmp_path, "dataset=cifar10", f"dataset.root={tmp_path / 'cifar'}")
    assert len(rows) == 2 and rows[-1]["replies"] == 3


@pytest.mark.slow  # in CI through make test-slow; keeps the default suite short
@pytest.mark.ray
def test_class_incremental_stream_on_writers(tmp_path):
    root = files.write_hf(tmp_path / "data")
    rows = run_ok(
        tmp_path,
        *natural_args(root),
        "lifelong=class_incremental",
        "lifelong.num_tasks=2",
        "lifelong.rounds_per_task=1",
    )
    assert [r["task"] for r in rows] == [0, 1]
    assert len(rows[-1]["accuracy_matrix"]) == 2  # one row per finished task
    assert len(rows[-1]["task_accuracy"]) == 2


@pytest.mark.parametrize(
    ("make", "args", "needle"),
    [
        (None, ("dataset=hf",), "dataset.path=None is not allowed"),
        ("hf", ("dataset.image_key=img",), "dataset.image_key='img' is not a column"),
        ("hf", ("num_clients=4", "clients_per_round=4"), "num_clients=4 is not allowed: 6"),
        ("hf", ("dataset.owner_key=null",), "partition.name='natural' is not allowed"),
        ("hf", ("dataset.test_split=valid",), "dataset.test_split='valid' is not a split"),
        ("cifar", (), "refused to unpickle posix.system"),
        ("folder", (), "is grey 12x12 but"),
    ],
)
def test_bad_dataset_input_is_one_line_and_exit_code_2(tmp_path, make, args, needle):
    base: tuple[str, ...] = ()
    if make == "hf":
        base = natural_args(files.write_hf(tmp_path / "data", n_train=120, n_test=20))
    elif make == "cifar":
        folder = files.write_cifar(tmp_path / "cifar")
        files.write_malicious(folder / "test_batch", tmp_path / "ran")
        base = ("dataset=cifar10", f"dataset.root={folder}")
    elif make == "folder":
        root = files.write_folder(tmp_path / "data", n_train=40, n_test=12)
        from PIL import Image

        Image.new("L", (12, 12)).save(root / "train" / "3" / "zz.png")
        base = ("dataset=folder", f"dataset.path={root}")
    proc = fedkd_sim(tmp_path, *SMALL, *base, *args, f"hydra.run.dir={tmp_path / 'run'}")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("fedkd-sim: error: "), proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "ran").exists()

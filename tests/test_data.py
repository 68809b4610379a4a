import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedkd.data import datasets as ds
from fedkd.data.federated import build_federated_data
from fedkd.data.partition import partition_labels
from fedkd.errors import ConfigError, DataError

FMNIST = ds.SYSTEM_FASHION_MNIST
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-labels-idx1-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed (make test installs it)",
)


def _write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_read_idx_round_trip_and_corruption(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(ds.read_idx(tmp_path / "a.gz"), arr)
    _write_idx(tmp_path / "b", arr, gz=False)
    assert np.array_equal(ds.read_idx(tmp_path / "b"), arr)

    raw = (tmp_path / "b").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-5])
    with pytest.raises(DataError, match="corrupt"):
        ds.read_idx(tmp_path / "short")
    (tmp_path / "magic").write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(DataError, match="magic"):
        ds.read_idx(tmp_path / "magic")
    (tmp_path / "notgz.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read"):
        ds.read_idx(tmp_path / "notgz.gz")


def test_fashion_mnist_missing_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "SYSTEM_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setattr(ds, "DEFAULT_DOWNLOAD_ROOT", tmp_path / "cache")
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        ds.load_fashion_mnist(root=str(tmp_path / "empty"), download=False)


def test_fashion_mnist_from_a_configured_root(tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "SYSTEM_FASHION_MNIST", tmp_path / "nowhere")
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("t10k", 20)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    splits = ds.load_fashion_mnist(root=str(tmp_path), download=False)
    assert splits.train.x.shape == (50, 1, 28, 28) and splits.test.x.shape == (20, 1, 28, 28)
    assert splits.source == str(tmp_path)


def test_fashion_mnist_label_image_mismatch_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "SYSTEM_FASHION_MNIST", tmp_path / "nowhere")
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("t10k", 20)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n + 1))
    with pytest.raises(DataError, match="disagree"):
        ds.load_fashion_mnist(root=str(tmp_path), download=False)


@needs_fmnist
def test_fashion_mnist_from_debian_package():
    splits = ds.load_fashion_mnist(root=None, download=False)
    assert splits.train.x.shape == (60000, 1, 28, 28)
    assert splits.test.x.shape == (10000, 1, 28, 28)
    assert np.bincount(splits.train.y).tolist() == [6000] * 10
    assert splits.source == str(FMNIST)


def test_cifar10_missing_is_a_data_error(tmp_path):
    from fedkd.data.cifar import load_cifar

    with pytest.raises(DataError, match="cifar10"):
        load_cifar("cifar10", root=str(tmp_path), download=False)


def test_synthetic_is_seeded():
    a = ds.load_synthetic(10, 1, 8, 100, 20, 0.3, seed=1)
    b = ds.load_synthetic(10, 1, 8, 100, 20, 0.3, seed=1)
    c = ds.load_synthetic(10, 1, 8, 100, 20, 0.3, seed=2)
    assert np.array_equal(a.train.x, b.train.x) and np.array_equal(a.train.y, b.train.y)
    assert not np.array_equal(a.train.x, c.train.x)


LABELS = np.random.default_rng(0).integers(0, 10, 3000)


@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "iid"},
        {"name": "dirichlet", "alpha": 0.5, "min_size": 10},
        {"name": "inner_dirichlet", "alpha": 0.5},
        {"name": "pathological", "classes_per_client": 2},
        {"name": "shards", "shards_per_client": 2},
    ],
    ids=lambda c: c["name"],
)
def test_partitioners_are_seeded_disjoint_and_complete(cfg):
    a = partition_labels(LABELS, cfg, 10, seed=3)
    b = partition_labels(LABELS, cfg, 10, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    flat = np.concatenate(a)
    assert len(flat) == len(np.unique(flat))  # disjoint
    if cfg["name"] != "shards":  # shards may drop an incomplete last shard
        assert len(flat) == len(LABELS)
    c = partition_labels(LABELS, cfg, 10, seed=4)
    if cfg["name"] != "shards":
        assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_alpha_controls_skew():
    def classes_per_client(alpha):
        parts = partition_labels(
            LABELS, {"name": "dirichlet", "alpha": alpha, "min_size": 1}, 10, 0
        )
        return np.mean(
            [(np.bincount(LABELS[p], minlength=10) > 0.05 * len(p)).sum() for p in parts]
        )

    assert classes_per_client(0.1) < classes_per_client(100.0)
    assert classes_per_client(100.0) == 10


def test_inner_dirichlet_gives_equal_clients_with_their_own_class_mix():
    parts = partition_labels(LABELS, {"name": "inner_dirichlet", "alpha": 0.5}, 7, 0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(LABELS)
    mixes = np.array([np.bincount(LABELS[p], minlength=10) / len(p) for p in parts])
    assert mixes.max(1).min() > 0.2  # Dir(0.5): every client leans on a few classes
    assert len(set(mixes.argmax(1).tolist())) > 1  # ... not all on the same one


def test_pathological_gives_k_classes():
    parts = partition_labels(LABELS, {"name": "pathological", "classes_per_client": 2}, 10, 0)
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)


def test_more_clients_than_samples():
    with pytest.raises(DataError, match="num_clients"):
        partition_labels(LABELS[:5], {"name": "iid"}, 10, 0)


def _fed_cfg(**kw):
    cfg = {
        "dataset": {
            "name": "synthetic",
            "root": None,
            "download": False,
            "synthetic": {
                "num_classes": 10,
                "channels": 1,
                "image_size": 8,
                "train_size": 1000,
                "test_size": 100,
                "noise": 0.3,
                "seed": 0,
            },
        },
        "partition": {"name": "dirichlet", "alpha": 0.5, "min_size": 5},
        "proxy": {"size": 200, "subset_size": None},
        "num_clients": 5,
        "seed": 0,
        "eval": {"client_test_size": 50, "batch_size": 100},
    }
    cfg.update(kw)
    return cfg


def test_proxy_is_disjoint_from_shards_and_test_is_separate():
    data = build_federated_data(_fed_cfg())
    private_rows = set(data.private_index.tolist())
    proxy_rows = set(data.proxy_index.tolist())
    assert not private_rows & proxy_rows
    assert len(private_rows) + len(proxy_rows) == 1000
    shard_rows = [set(data.private_index[s].tolist()) for s in data.shards]
    assert sum(len(s) for s in shard_rows) == len(set().union(*shard_rows)) == 800
    assert data.proxy_x.shape == (200, 1, 8, 8)
    assert data.client_task_tests[0][0].shape[0] == 50 and data.task_tests[0][0].shape[0] == 100


def test_proxy_larger_than_data_is_a_config_error():
    with pytest.raises(ConfigError, match=r"proxy\.size"):
        build_federated_data(_fed_cfg(proxy={"size": 1000, "subset_size": None}))
    with pytest.raises(ConfigError, match=r"num_clients=5 is not allowed: at most 1"):
        build_federated_data(_fed_cfg(proxy={"size": 999, "subset_size": None}))


def test_shared_tests_copy_fixture_data(tmp_path):
    if not (FMNIST / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip("no Debian Fashion-MNIST")
    shutil.copy(FMNIST / "t10k-labels-idx1-ubyte.gz", tmp_path / "x.gz")
    assert ds.read_idx(tmp_path / "x.gz").shape == (10000,)

"""The federated view on every new dataset, as on Fashion-MNIST: the proxy set apart
from every shard, the test split, and static, class- and domain-incremental streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedkd.data.federated import build_federated_data
from fedkd.protocol import ProxySegment
from tests import dataset_files as files

STREAMS = {
    "none": {"name": "none"},
    "class_incremental": {"name": "class_incremental", "num_tasks": 2, "rounds_per_task": 2},
    "domain_incremental": {"name": "domain_incremental", "num_tasks": 2, "rounds_per_task": 2},
}


@pytest.fixture(autouse=True)
def _private_caches(tmp_path, monkeypatch):
    import datasets.config

    from fedkd.data import datasets as ds
    from fedkd.data import hf, shards

    for module in (ds, hf, shards):
        monkeypatch.setattr(module, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    hf.open_splits.cache_clear()


def dataset_section(kind: str, tmp_path) -> dict:
    if kind == "hf":
        return {"name": "hf", "path": str(files.write_hf(tmp_path / "d", channels=3))}
    if kind == "folder":
        return {"name": "folder", "path": str(files.write_folder(tmp_path / "d", channels=1))}
    files.write_cifar(tmp_path / "d", hundred=kind == "cifar100")
    return {"name": kind, "root": str(tmp_path / "d"), "download": False}


@pytest.mark.parametrize("stream", list(STREAMS))
@pytest.mark.parametrize("kind", ["hf", "folder", "cifar10", "cifar100"])
def test_proxy_shards_tests_and_streams(tmp_path, kind, stream):
    partition = (
        {"name": "iid"} if kind != "cifar10" else {"name": "dirichlet", "alpha": 0.5, "min_size": 1}
    )
    cfg = {
        "dataset": dataset_section(kind, tmp_path),
        "partition": partition,
        "proxy": {"size": 30, "subset_size": None},
        "num_clients": 3,
        "seed": 0,
        "rounds": 4,
        "lifelong": STREAMS[stream],
        "eval": {"client_test_size": 20, "batch_size": 100},
    }
    if stream == "class_incremental":  # the fixtures fill classes 0..3 (of 10 or 100 for CIFAR)
        cfg["lifelong"] = cfg["lifelong"] | {"task_classes": [[0, 1], [2, 3]]}
    data = build_federated_data(cfg)
    assert data.num_tasks == (1 if stream == "none" else 2)
    proxy = set(data.proxy_index.tolist())
    for t in range(data.num_tasks):
        for c in range(3):
            rows = data.private_index[data.task_shards[t][c]]
            assert len(rows) and not proxy & set(rows.tolist())
            x, y = data.client_data(c, t)
            assert x.dtype == torch.float32 and x.shape[1:] == data.input_shape
            if stream == "class_incremental":
                assert set(y.tolist()) <= set(data.stream.task_classes[t])
        tx, ty = data.task_tests[t]
        assert len(tx) == len(ty) > 0 and tx.shape[1:] == data.input_shape
    inputs = data.proxy_inputs([ProxySegment(task=data.num_tasks - 1, seed=1, count=10)])
    assert inputs.shape == (10, *data.input_shape) and torch.isfinite(inputs).all()
    assert np.isfinite(data.channel_stats[0]).all()

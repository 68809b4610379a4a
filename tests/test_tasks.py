"""Task streams, per-task data, proxy pools under drift."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedkd.data.federated import build_federated_data
from fedkd.data.tasks import build_stream
from fedkd.errors import ConfigError


def stream(**kw):
    cfg = {"name": "class_incremental", "num_tasks": 5, "rounds_per_task": 3} | kw
    return build_stream(cfg, num_classes=10, rounds=15, seed=0)


def test_schedule_and_boundaries():
    s = stream()
    assert [s.global_task(r) for r in range(1, 16)] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 + [
        4
    ] * 3
    assert [r for r in range(1, 16) if s.is_task_end(r, 15)] == [3, 6, 9, 12, 15]
    assert s.task_classes == ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
    s2 = build_stream({"name": "class_incremental", "num_tasks": 2, "rounds_per_task": 2}, 10, 7, 0)
    assert [s2.global_task(r) for r in range(1, 8)] == [
        0,
        0,
        1,
        1,
        1,
        1,
        1,
    ]  # extra rounds: last task
    assert [r for r in range(1, 8) if s2.is_task_end(r, 7)] == [2, 7]


def test_stagger_and_per_client_order():
    s = stream(stagger_rounds=2, per_client_order=True)
    offsets = {s.offset(p) for p in range(20)}
    assert offsets <= {0, 1, 2} and len(offsets) > 1
    for pid in range(5):
        order = s.order(pid)
        assert sorted(order) == list(range(5))
        seen = [s.client_task(r, pid) for r in range(1, 16)]
        assert seen[0] == order[0]
        # a late client is still on its previous task when the schedule moves on
        if s.offset(pid) > 0:
            assert seen[3] == order[0]
    assert len({tuple(s.order(p)) for p in range(10)}) > 1


def test_domain_transforms():
    rot = build_stream(
        {"name": "domain_incremental", "num_tasks": 4, "rounds_per_task": 1}, 10, 4, 0
    )
    assert rot.angles == (0.0, 45.0, 90.0, 135.0)
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(rot.transform(x, 0), x)
    assert torch.allclose(rot.transform(x, 2), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5)
    perm = build_stream(
        {
            "name": "domain_incremental",
            "num_tasks": 3,
            "rounds_per_task": 1,
            "domain": "permutation",
        },
        10,
        3,
        0,
    )
    y = perm.transform(x, 1)
    assert not torch.equal(y, x)
    assert torch.equal(torch.sort(y.flatten(1)).values, torch.sort(x.flatten(1)).values)


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"num_tasks": 11}, "lifelong.num_tasks"),
        ({"task_classes": [[0, 1], [], [2], [3], [4]]}, "lifelong.task_classes"),
        ({"task_classes": [[0, 1], [1, 2], [3], [4], [5]]}, "lifelong.task_classes"),
        ({"task_classes": [[0, 1], [2]]}, "lifelong.task_classes"),
        ({"rounds_per_task": 4}, "lifelong.rounds_per_task"),
        ({"name": "task_free"}, "lifelong.name"),
        ({"stagger_rounds": 3}, "lifelong.stagger_rounds"),
    ],
)
def test_bad_streams(cfg, key):
    with pytest.raises(ConfigError) as info:
        stream(**cfg)
    assert info.value.key == key


def fed_cfg(lifelong, partition=None, **kw):
    cfg = {
        "dataset": {
            "name": "synthetic",
            "root": None,
            "download": False,
            "synthetic": {
                "num_classes": 10,
                "channels": 1,
                "image_size": 8,
                "train_size": 3000,
                "test_size": 500,
                "noise": 0.3,
                "seed": 0,
            },
        },
        "partition": partition or {"name": "dirichlet", "alpha": 0.5, "min_size": 5},
        "proxy": {"size": 500, "subset_size": None},
        "num_clients": 4,
        "seed": 0,
        "rounds": 10,
        "eval": {"client_test_size": 20, "teacher_test_size": 40, "batch_size": 100},
        "lifelong": {"rounds_per_task": 2, "num_tasks": 5} | lifelong,
    }
    return cfg | kw


def test_class_incremental_shards_hold_only_their_task_and_every_client_has_each_task():
    data = build_federated_data(fed_cfg({"name": "class_incremental", "proxy": "drifting"}))
    for task, classes in enumerate(data.stream.task_classes):
        for pid in range(4):
            labels = data.client_labels(pid, task)
            assert len(labels) >= 5 and set(labels.tolist()) <= set(classes)
        pool = data.proxy_pool(task)
        assert set(data.proxy_y[pool.rows].tolist()) <= set(classes)
        _, y = data.task_tests[task]
        assert set(y.tolist()) <= set(classes) and len(y) == 40
        assert len(data.client_task_tests[task][1]) == 20
    every = np.concatenate([np.concatenate(t) for t in data.task_shards])
    assert len(every) == len(np.unique(every))  # disjoint across tasks and clients


def test_stationary_proxy_spans_all_tasks():
    data = build_federated_data(fed_cfg({"name": "class_incremental", "proxy": "stationary"}))
    assert len(data.proxy_pool(0).rows) == len(data.proxy_pool(3).rows) == 500


def test_domain_incremental_pools_are_disjoint_and_transformed():
    data = build_federated_data(fed_cfg({"name": "domain_incremental", "proxy": "stationary"}))
    pools = [np.concatenate(t) for t in data.task_shards]
    assert sum(len(p) for p in pools) == len(np.unique(np.concatenate(pools)))
    x0, _ = data.client_data(0, 0)
    raw = data.normalize(data.splits.train.x[data.private_index[data.task_shards[0][0]]])
    assert torch.equal(x0, raw)
    x2, _ = data.client_data(0, 2)
    raw2 = data.normalize(data.splits.train.x[data.private_index[data.task_shards[2][0]]])
    assert not torch.equal(x2, raw2)  # rotated
    pool = data.proxy_pool(0)
    assert len(set(pool.tasks.tolist())) > 1  # public data from every task's domain

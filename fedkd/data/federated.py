"""The federated view of a dataset: private shards per task, a public proxy set, tests.

The training split is cut in two by a seeded permutation: the first `proxy.size`
samples become the public proxy set (its labels are never a training target), the
rest is private. The private part is divided into task pools (one pool for static
data; the classes of each task for class-incremental streams; disjoint random parts
for domain-incremental ones) and each pool is partitioned over the clients, so a
Dirichlet(alpha) split holds within every task. The proxy set is disjoint from every
shard and from the test split by construction. `fedkd.data.shards` makes this cut
and caches it on disk.

Images stay uint8 in memory and are normalised (and transformed for their task) when
a piece of work needs them. `federated_data(cfg)` builds all this once per process.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import numpy as np
import torch

from fedkd.data.datasets import DatasetSplits, load_dataset, public_channel_stats
from fedkd.data.shards import cut_training_split
from fedkd.data.tasks import TaskStream, build_stream
from fedkd.errors import ConfigError
from fedkd.protocol import ProxySegment, proxy_subset
from fedkd.seeding import numpy_rng

PROXY_MODES = ("stationary", "drifting")


@dataclass(frozen=True)
class ProxyPool:
    """Proxy items available for one task: rows of the proxy set and their task transform."""

    rows: np.ndarray
    tasks: np.ndarray


@dataclass
class FederatedData:
    splits: DatasetSplits
    stream: TaskStream
    proxy_index: np.ndarray  # into splits.train
    private_index: np.ndarray  # into splits.train
    task_shards: list[list[np.ndarray]]  # [task][client] -> rows of private_index
    proxy_mode: str
    client_test_size: int | None  # per task, for students
    teacher_test_size: int | None  # per task, for the server model
    seed: int
    # per-channel (mean, std) in [0, 1]; None: computed from the public proxy set (a
    # device, which holds only its shard, gets the federation's values from its bundle)
    channel_stats: tuple[np.ndarray, np.ndarray] | None = None
    _mean: torch.Tensor = field(init=False)
    _std: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if self.channel_stats is None:
            self.channel_stats = public_channel_stats(self.splits.train.x[self.proxy_index])
        mean, std = self.channel_stats
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._pools: dict[int, ProxyPool] = {}

    # ------------------------------------------------------------------ shape facts
    @property
    def num_classes(self) -> int:
        return self.splits.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.splits.input_shape

    @property
    def num_clients(self) -> int:
        return len(self.task_shards[0])

    @property
    def num_tasks(self) -> int:
        return self.stream.num_tasks

    @cached_property
    def shards(self) -> list[np.ndarray]:
        """Each client's rows over all tasks."""
        return [np.concatenate([t[c] for t in self.task_shards]) for c in range(self.num_clients)]

    # --------------------------------------------------------------------- tensors
    def normalize(self, x: np.ndarray, task: int = 0) -> torch.Tensor:
        """uint8 (N, C, H, W) -> normalised float32 tensor, transformed for `task`."""
        t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
        return self.stream.transform(t.sub_(self._mean).div_(self._std), task)

    def rows_data(self, rows: np.ndarray, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Private samples (rows of private_index) as seen in task `task`."""
        train_rows = self.private_index[rows]
        return self.normalize(self.splits.train.x[train_rows], task), torch.from_numpy(
            self.splits.train.y[train_rows]
        )

    def client_data(self, partition_id: int, task: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A client's private data for one task."""
        return self.rows_data(self.task_shards[task][partition_id], task)

    def client_labels(self, partition_id: int, task: int = 0) -> np.ndarray:
        return self.splits.train.y[self.private_index[self.task_shards[task][partition_id]]]

    def pooled_data(self, task: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """All clients' data of one task together (`central` trains on this)."""
        rows = np.concatenate([s for s in self.task_shards[task]])
        return self.rows_data(np.sort(rows), task)

    # ----------------------------------------------------------------------- proxy
    def proxy_pool(self, task: int) -> ProxyPool:
        """The proxy items of `task`: the whole set (stationary) or the task's part."""
        key = 0 if self.proxy_mode == "stationary" else task
        if key not in self._pools:
            n = len(self.proxy_index)
            stream = self.stream
            if self.proxy_mode == "stationary" or not stream.lifelong:
                rows = np.arange(n)
                tasks = np.zeros(n, np.int64)
                if stream.kind == "domain_incremental":  # public data from every task
                    tasks = numpy_rng(self.seed, "proxy-tasks").integers(0, stream.num_tasks, n)
            elif stream.kind == "class_incremental":
                # The hidden labels only select which public samples exist at this
                # time; they are never a training target.
                labels = self.splits.train.y[self.proxy_index]
                rows = np.flatnonzero(np.isin(labels, stream.task_classes[task]))
                tasks = np.full(len(rows), task, np.int64)
            else:
                rows = np.arange(n)
                tasks = np.full(n, task, np.int64)
            self._pools[key] = ProxyPool(rows, tasks)
        return self._pools[key]

    def proxy_items(self, segments: list[ProxySegment]) -> tuple[np.ndarray, np.ndarray]:
        """(rows of the proxy set, task of each) for a round's proxy segments."""
        rows, tasks = [], []
        for seg in segments:
            pool = self.proxy_pool(seg.task)
            pick = proxy_subset(seg.seed, len(pool.rows), seg.count)
            rows.append(pool.rows[pick])
            tasks.append(pool.tasks[pick])
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(rows), np.concatenate(tasks)

    def proxy_inputs(self, segments: list[ProxySegment]) -> torch.Tensor:
        """The normalised (and task-transformed) proxy images of a round."""
        rows, tasks = self.proxy_items(segments)
        images = self.splits.train.x[self.proxy_index[rows]]
        if not self.stream.lifelong or self.stream.kind != "domain_incremental":
            return self.normalize(images)
        out = torch.empty((len(rows), *self.input_shape))
        for t in np.unique(tasks):
            sel = np.flatnonzero(tasks == t)
            out[torch.from_numpy(sel)] = self.normalize(images[sel], int(t))
        return out

    def proxy_pool_size(self, task: int) -> int:
        return len(self.proxy_pool(task).rows)

    @cached_property
    def proxy_x(self) -> torch.Tensor:
        """The whole proxy set, untransformed."""
        return self.normalize(self.splits.train.x[self.proxy_index])

    @cached_property
    def proxy_digest(self) -> str:
        """A fingerprint of the proxy images in order: the server admits only nodes
        whose proxy set is the same as its own (round plans index into it)."""
        return digest_images(self.splits.train.x[self.proxy_index])

    @cached_property
    def proxy_y(self) -> np.ndarray:
        """For reporting only: never used for training."""
        return self.splits.train.y[self.proxy_index]

    # ------------------------------------------------------------------------ tests
    def _task_tests(self, size: int | None, tag: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        test = self.splits.test
        out = []
        for task in range(self.num_tasks):
            if self.stream.kind == "class_incremental":
                rows = np.flatnonzero(np.isin(test.y, self.stream.task_classes[task]))
            else:
                rows = np.arange(len(test.y))
            if size is not None and size < len(rows):
                keys = (self.seed, tag) if task == 0 else (self.seed, tag, task)
                rows = rows[np.sort(numpy_rng(*keys).permutation(len(rows))[:size])]
            out.append((self.normalize(test.x[rows], task), torch.from_numpy(test.y[rows])))
        return out

    @cached_property
    def task_tests(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per task: the test data the server model is scored on."""
        return self._task_tests(self.teacher_test_size, "teacher-test")

    @cached_property
    def client_task_tests(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per task: the (smaller, seeded, shared) test data every student is scored on."""
        return self._task_tests(self.client_test_size, "client-test")

    def describe(self) -> dict[str, Any]:
        sizes = [len(s) for s in self.shards]
        return {
            "dataset": self.splits.name,
            "source": self.splits.source,
            "tasks": self.num_tasks,
            "proxy": len(self.proxy_index),
            "private": len(self.private_index),
            "test": len(self.splits.test),
            "shard_min": min(sizes),
            "shard_max": max(sizes),
        }


def digest_images(images: np.ndarray) -> str:
    """A short fingerprint of uint8 proxy images, in order."""
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]


def build_federated_data(cfg: dict) -> FederatedData:
    """Load the dataset, split off the proxy set, partition each task's pool.

    Raises ConfigError/DataError when the config does not fit the data.
    """
    splits = load_dataset(cfg["dataset"])
    n_train = len(splits.train)
    proxy_size = int(cfg["proxy"]["size"])
    num_clients = int(cfg["num_clients"])
    if proxy_size >= n_train:
        raise ConfigError(
            "proxy.size",
            proxy_size,
            f"smaller than the {n_train} samples of the {splits.name} training split",
        )
    if n_train - proxy_size < num_clients:
        raise ConfigError(
            "num_clients",
            num_clients,
            f"at most {n_train - proxy_size}, the private samples left after the proxy split "
            "(each client needs at least one)",
        )
    seed = int(cfg["seed"])
    lifelong = cfg.get("lifelong") or {"name": "none"}
    stream = build_stream(lifelong, splits.num_classes, int(cfg.get("rounds", 1)), seed)
    proxy_mode = lifelong.get("proxy", "stationary")
    if proxy_mode not in PROXY_MODES:
        raise ConfigError("lifelong.proxy", proxy_mode, "one of " + ", ".join(PROXY_MODES))
    proxy_index, private_index, task_shards = cut_training_split(cfg, splits, stream)
    ev = cfg["eval"]
    return FederatedData(
        splits=splits,
        stream=stream,
        proxy_index=proxy_index,
        private_index=private_index,
        task_shards=task_shards,
        proxy_mode=proxy_mode,
        client_test_size=ev["client_test_size"],
        teacher_test_size=ev.get("teacher_test_size"),
        seed=seed,
    )


def data_key(cfg: dict) -> str:
    """The part of the config that determines the federated data."""
    keys = ("dataset", "partition", "proxy", "num_clients", "seed", "eval", "rounds", "lifelong")
    return json.dumps({k: cfg.get(k) for k in keys}, sort_keys=True)


@lru_cache(maxsize=2)
def _cached(key: str) -> FederatedData:
    return build_federated_data(json.loads(key))


def federated_data(cfg: dict) -> FederatedData:
    """This process's copy of the federated data for `cfg`, built on first use.

    Ray reuses worker processes across client calls, so each worker loads the data
    once and every later call of any client is free.
    """
    return _cached(data_key(cfg))

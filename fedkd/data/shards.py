"""The cut of the training split: the proxy set, the private task pools and each
client's shard of every pool, seeded by the config and cached on disk (keyed by the
settings that decide it), so the other processes of a run (and later runs) reuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np

from fedkd.atomic import write_atomic
from fedkd.data.datasets import CACHE_DIR, DatasetSplits
from fedkd.data.partition import partition_labels
from fedkd.data.tasks import TaskStream
from fedkd.errors import ConfigError, DataError
from fedkd.seeding import numpy_rng

# (proxy_index, private_index, task_shards): rows of the training split, rows of the
# training split, and per task per client rows of private_index.
Cut = tuple[np.ndarray, np.ndarray, list[list[np.ndarray]]]


def _task_pools(stream: TaskStream, labels: np.ndarray, seed: int) -> list[np.ndarray]:
    if stream.kind == "class_incremental":
        return [np.flatnonzero(np.isin(labels, cls)) for cls in stream.task_classes]
    if stream.kind == "domain_incremental":
        order = numpy_rng(seed, "domain-split").permutation(len(labels))
        return [np.sort(part) for part in np.array_split(order, stream.num_tasks)]
    return [np.arange(len(labels))]


def cut_training_split(cfg: dict, splits: DatasetSplits, stream: TaskStream) -> Cut:
    """The first `proxy.size` samples of a seeded permutation are the proxy set, the
    rest is private; each task's pool of it is partitioned over the clients. Read from
    the cache when this config's cut is there, else computed and cached."""
    cached = load_split(cfg, splits, stream.num_tasks)
    if cached is not None:
        return cached
    seed = int(cfg["seed"])
    proxy_size = int(cfg["proxy"]["size"])
    num_clients = int(cfg["num_clients"])
    order = numpy_rng(seed, "proxy-split").permutation(len(splits.train))
    proxy_index = np.sort(order[:proxy_size])
    private_index = np.sort(order[proxy_size:])
    labels = splits.train.y[private_index]
    owners = owner_clients(cfg, splits, private_index)
    task_shards = []
    for task, pool in enumerate(_task_pools(stream, labels, seed)):
        own = None if owners is None else _owners_in_task(owners[0], owners[1], pool, task)
        parts = partition_labels(
            labels[pool], cfg["partition"], num_clients, seed, task=task, owners=own
        )
        task_shards.append([pool[p] for p in parts])
    save_split(cfg, splits, proxy_index, private_index, task_shards)
    return proxy_index, private_index, task_shards


def owner_clients(
    cfg: dict, splits: DatasetSplits, private_index: np.ndarray
) -> tuple[np.ndarray, list[str]] | None:
    """partition=natural: each private sample's client id, and each client's owner.

    One client per owner that keeps private samples after the proxy cut, in sorted
    order of the owner values; num_clients must be their number. An owner whose
    samples all went to the proxy set is no client (its samples are public)."""
    if cfg["partition"]["name"] != "natural":
        return None
    key = cfg["dataset"].get("owner_key")
    if splits.train.owner is None:
        raise ConfigError(
            "partition.name",
            "natural",
            f"a dataset with an owner column (dataset=hf with dataset.owner_key set); "
            f"dataset {splits.name!r} names no owners",
        )
    codes = splits.train.owner[private_index]
    present = np.unique(codes)
    num_clients = int(cfg["num_clients"])
    if len(present) != num_clients:
        total = len(splits.owner_names)
        raise ConfigError(
            "num_clients",
            num_clients,
            f"{len(present)} (partition=natural gives one client per owner of "
            f"dataset.owner_key={key!r}; the private data holds {len(present)} of the {total} "
            f"owners, {total - len(present)} gave all their samples to the proxy set)",
        )
    return np.searchsorted(present, codes), [splits.owner_names[c] for c in present]


def _owners_in_task(clients: np.ndarray, names: list[str], pool: np.ndarray, task: int):
    """The client ids of a task's pool; every client must have samples in it."""
    own = clients[pool]
    missing = np.setdiff1d(np.arange(len(names)), own)
    if len(missing):
        shown = ", ".join(repr(names[c]) for c in missing[:5])
        raise DataError(
            f"partition.name='natural': {len(missing)} of the {len(names)} owners have no "
            f"private samples in task {task} ({shown}{', ...' if len(missing) > 5 else ''}); "
            "every client needs data in every task: use fewer tasks or another partition"
        )
    return own


# Bump when the way splits are computed changes: cached splits are keyed by it.
SPLIT_VERSION = 1

# The `lifelong` settings that decide the cut (the task pools). The others (proxy
# mode, staggering, per-client task order) only decide what is used when.
SPLIT_LIFELONG_KEYS = ("name", "num_tasks", "rounds_per_task", "task_classes", "domain", "angles")


def split_path(cfg: dict, splits: DatasetSplits) -> Path:
    keys = ("dataset", "partition", "proxy", "num_clients", "seed", "rounds", "lifelong")
    what = {k: cfg.get(k) for k in keys} | {"version": SPLIT_VERSION, "source": splits.source}
    what["data"] = _data_digest(splits)  # files changed under the same path: a new cut
    what["proxy"] = {"size": cfg["proxy"]["size"]}  # subset_size does not change the split
    lifelong = cfg.get("lifelong") or {}
    what["lifelong"] = {k: lifelong[k] for k in SPLIT_LIFELONG_KEYS if k in lifelong}
    digest = hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return CACHE_DIR / "splits" / f"{splits.name}-{digest}.npz"


def _data_digest(splits: DatasetSplits) -> str:
    """Cheap: the labels, owners and image shape of the training split."""
    h = hashlib.sha1(str(splits.train.x.shape).encode())
    h.update(np.ascontiguousarray(splits.train.y).tobytes())
    if splits.train.owner is not None:
        h.update(np.ascontiguousarray(splits.train.owner).tobytes())
    return h.hexdigest()[:16]


def save_split(cfg, splits, proxy_index, private_index, task_shards) -> None:
    """Cache the split so the other processes of the run (and later runs) skip
    partitioning; a pure function of the config, so reusing it is safe."""
    path = split_path(cfg, splits)
    arrays = {"proxy": proxy_index, "private": private_index}
    for t, shards in enumerate(task_shards):
        sizes = np.array([len(s) for s in shards])
        arrays[f"t{t}_rows"] = np.concatenate(shards) if shards else np.zeros(0, np.int64)
        arrays[f"t{t}_sizes"] = sizes
    with contextlib.suppress(OSError):  # no cache, no harm
        write_atomic(path, lambda f: np.savez(f, **arrays))


def load_split(cfg, splits, num_tasks) -> Cut | None:
    path = split_path(cfg, splits)
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            task_shards = [
                np.split(z[f"t{t}_rows"], np.cumsum(z[f"t{t}_sizes"])[:-1])
                for t in range(num_tasks)
            ]
            return z["proxy"], z["private"], task_shards
    except (OSError, ValueError, KeyError):
        path.unlink(missing_ok=True)
        return None

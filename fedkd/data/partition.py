"""Seeded non-IID partitioning with flwr-datasets' partitioners on in-memory labels.

Only the labels go into a `datasets.Dataset`, together with each sample's index, so
the partitioners return index lists into the caller's arrays. `natural` splits by an
owner column instead (flwr-datasets' NaturalIdPartitioner): the caller passes each
sample's client id (fedkd.data.shards maps owners to clients).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from fedkd.errors import DataError
from fedkd.registry import Registry
from fedkd.seeding import derive_seed, numpy_rng

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

# partition.name -> a builder of a flwr-datasets partitioner from
# (the `partition` config section, num_clients, seed, number of samples to split)
PARTITIONERS: Registry[Callable[[dict, int, int, int], Partitioner]] = Registry(
    "partitioner", "partition.name"
)


def list_partitioners() -> list[str]:
    return PARTITIONERS.names()


@PARTITIONERS.register("iid")
def iid(cfg: dict, num_clients: int, seed: int, num_samples: int) -> Partitioner:
    from flwr_datasets.partitioner import IidPartitioner

    return IidPartitioner(num_clients)  # contiguous blocks: partition_labels shuffles first


@PARTITIONERS.register("dirichlet")
def dirichlet(cfg: dict, num_clients: int, seed: int, num_samples: int) -> Partitioner:
    from flwr_datasets.partitioner import DirichletPartitioner

    return DirichletPartitioner(
        num_clients,
        partition_by="label",
        alpha=float(cfg["alpha"]),
        min_partition_size=int(cfg["min_size"]),
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )


@PARTITIONERS.register("inner_dirichlet")
def inner_dirichlet(cfg: dict, num_clients: int, seed: int, num_samples: int) -> Partitioner:
    """Equal-sized clients, each with its own class mix ~ Dir(alpha) (FedDyn's split,
    FedLab's and BlazeFL's `client_inner_dirichlet`)."""
    from flwr_datasets.partitioner import InnerDirichletPartitioner

    base, extra = divmod(num_samples, num_clients)
    sizes = [base + (i < extra) for i in range(num_clients)]
    return InnerDirichletPartitioner(
        sizes, partition_by="label", alpha=float(cfg["alpha"]), shuffle=True, seed=seed
    )


@PARTITIONERS.register("pathological")
def pathological(cfg: dict, num_clients: int, seed: int, num_samples: int) -> Partitioner:
    from flwr_datasets.partitioner import PathologicalPartitioner

    return PathologicalPartitioner(
        num_clients,
        partition_by="label",
        num_classes_per_partition=int(cfg["classes_per_client"]),
        class_assignment_mode="first-deterministic",  # every class is used
        shuffle=True,
        seed=seed,
    )


@PARTITIONERS.register("shards")
def shards(cfg: dict, num_clients: int, seed: int, num_samples: int) -> Partitioner:
    from flwr_datasets.partitioner import ShardPartitioner

    return ShardPartitioner(
        num_clients,
        partition_by="label",
        num_shards_per_partition=int(cfg["shards_per_client"]),
        shuffle=True,
        seed=seed,
    )


@PARTITIONERS.register("natural")
def natural(cfg: dict, num_clients: int, seed: int, num_samples: int) -> Partitioner:
    """One partition per distinct value of the `owner` column (a client id here)."""
    from flwr_datasets.partitioner import NaturalIdPartitioner

    return NaturalIdPartitioner(partition_by="owner")


def natural_shards(owners: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Indices of each client's samples, where `owners` holds each sample's client id
    (0..num_clients-1): NaturalIdPartitioner's partitions (one per id present, in
    sorted order) mapped back to the ids. A client with no sample gets none."""
    import datasets

    table = datasets.Dataset.from_dict({"owner": owners, "idx": np.arange(len(owners))})
    part = natural({}, num_clients, 0, len(owners))
    part.dataset = table
    shards = [np.zeros(0, np.int64) for _ in range(num_clients)]
    for pid in range(part.num_partitions):
        rows = part.load_partition(pid).with_format("numpy")["idx"][:]
        shards[int(part.partition_id_to_natural_id[pid])] = np.sort(np.asarray(rows, np.int64))
    return shards


def quiet_datasets() -> None:
    """No progress bars or info logs from `datasets` (the run's display is fedkd's)."""
    import datasets

    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.ERROR)


def partition_labels(
    labels: np.ndarray,
    cfg: dict,
    num_clients: int,
    seed: int,
    task: int = 0,
    owners: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split sample indices 0..len(labels)-1 over `num_clients` clients.

    `cfg` is the `partition` config section. The result is a pure function of
    (labels, cfg, num_clients, seed, task, owners). IID shuffles first, because
    flwr-datasets' IidPartitioner deals out contiguous blocks. `natural` needs
    `owners`: each sample's client id.
    """
    keys = (seed,) if task == 0 else (seed, task)
    import datasets

    quiet_datasets()
    where = f" of task {task}" if task else ""
    if len(labels) < num_clients:
        raise DataError(
            f"num_clients={num_clients} is more than the {len(labels)} private samples{where}; "
            "lower num_clients or proxy.size"
        )
    if cfg["name"] == "natural":
        if owners is None or len(owners) != len(labels):
            raise DataError("partition.name='natural' needs every sample's owner (owner_key)")
        return _no_empty(natural_shards(owners, num_clients), cfg, where)
    order = np.arange(len(labels))
    if cfg["name"] == "iid":
        order = numpy_rng(*keys, "iid-shuffle").permutation(len(labels))
    table = datasets.Dataset.from_dict({"label": labels[order], "idx": order})
    build = PARTITIONERS.get(cfg["name"])  # validate() rejects an unknown name earlier
    part = build(cfg, num_clients, derive_seed(*keys, "partition") % (2**32), len(labels))
    part.dataset = table
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shards = [
                np.sort(np.asarray(part.load_partition(i).with_format("numpy")["idx"][:], np.int64))
                for i in range(num_clients)
            ]
    except ValueError as exc:
        raise DataError(
            f"partition.name={cfg['name']!r} cannot split the {len(labels)} samples{where} over "
            f"{num_clients} clients: {exc}"
        ) from None
    return _no_empty(shards, cfg, where)


def _no_empty(shards: list[np.ndarray], cfg: dict, where: str) -> list[np.ndarray]:
    empty = [i for i, s in enumerate(shards) if len(s) == 0]
    if empty:
        raise DataError(
            f"partition.name={cfg['name']!r} left client(s) {empty[:5]} with no data{where}; "
            "lower num_clients or use a less skewed partition"
        )
    return shards

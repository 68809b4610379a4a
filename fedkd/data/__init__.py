"""Datasets, partitioning, the proxy split and (later) task streams."""

from fedkd.data.datasets import DatasetSplits, list_datasets, load_dataset
from fedkd.data.federated import FederatedData, build_federated_data, federated_data
from fedkd.data.partition import list_partitioners, partition_labels

__all__ = [
    "DatasetSplits",
    "FederatedData",
    "build_federated_data",
    "federated_data",
    "list_datasets",
    "list_partitioners",
    "load_dataset",
    "partition_labels",
]

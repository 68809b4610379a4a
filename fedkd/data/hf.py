"""Any image-classification dataset of the Hugging Face format (`dataset=hf`).

`dataset.path` is either
- a hub name (`uoft-cs/cifar10`, `flwrlabs/femnist`) or a local directory of data
  files (parquet, arrow, an image folder: what `datasets.load_dataset` reads). These go
  through flwr-datasets' `FederatedDataset`, which calls `datasets.load_dataset`; it
  is used to load the splits only (`load_split`, unshuffled), because fedkd
  partitions after cutting off the proxy set (fedkd.data.shards), with the same
  flwr-datasets partitioners on the private part;
- a directory written by `save_to_disk` (it holds dataset_dict.json or state.json).
  FederatedDataset cannot take one: `load_dataset` does not read that format (it
  takes the directory's JSON metadata for data rows), and the `arrow` builder would
  copy every file into the Hugging Face cache. `datasets.load_from_disk` maps the
  files as they are, so such a directory is opened with it.

Images (PIL images or uint8 arrays) become uint8 (N, C, H, W), grey as C=1 and colour
as C=3, all of one shape. Labels: a ClassLabel keeps its ids and its number of
classes; any other column is mapped to 0..K-1 in sorted order of its values over both
splits. `dataset.owner_key` names a column of owners (writer, user) that
`partition=natural` splits by. Without a test split (`dataset.test_split: null`) a
seeded `dataset.test_fraction` of the training split is held out as the test set.
Decoded arrays are cached in FEDKD_CACHE, keyed by the datasets' fingerprints, so
every worker after the first skips decoding.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.data.array_cache import cached_array
from fedkd.data.datasets import (
    CACHE_DIR,
    DATASETS,
    ArrayDataset,
    DatasetSplits,
    class_counter,
)
from fedkd.data.images import class_ids, decode_image, stack_images
from fedkd.data.partition import quiet_datasets
from fedkd.errors import DataError
from fedkd.seeding import numpy_rng

SAVE_TO_DISK_MARKERS = ("dataset_dict.json", "state.json")
BATCH = 1000


def _from_disk(local: Path, wanted: dict[str, str]) -> dict[str, Any]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(local))
    except Exception as exc:  # a damaged directory: any error of the format
        raise DataError(f"dataset.path={str(local)!r}: cannot load it from disk: {exc}") from None
    if isinstance(loaded, datasets.Dataset):  # one split saved on its own: the training split
        loaded = {"train": loaded}
    for key, name in wanted.items():
        if name not in loaded:
            raise DataError(
                f"dataset.{key}={name!r} is not a split of {local}: its splits are {sorted(loaded)}"
            )
    return {key: loaded[name] for key, name in wanted.items()}


def _from_hub(path: str, subset: str | None, wanted: dict[str, str]) -> dict[str, Any]:
    from flwr_datasets import FederatedDataset
    from flwr_datasets.common import telemetry

    if "FLWR_TELEMETRY_ENABLED" not in os.environ:
        # FederatedDataset posts a usage event naming the dataset (a local path too)
        # from every process that loads it; fedkd opts out unless the variable is set
        telemetry.FLWR_TELEMETRY_ENABLED = "0"

    fds = FederatedDataset(dataset=path, subset=subset, partitioners={}, shuffle=False)
    out = {}
    for key, name in wanted.items():
        try:
            out[key] = fds.load_split(name)  # the first call runs datasets.load_dataset
        except ValueError as exc:
            if "is not present in the dataset's splits" in str(exc):
                raise DataError(f"dataset.{key}={name!r}: {exc}") from None
            raise DataError(f"dataset.path={path!r}: cannot load it: {exc}") from None
        except Exception as exc:  # not found, no network, bad files: load_dataset's errors
            raise DataError(
                f"dataset.path={path!r} (dataset.subset={subset!r}): cannot load it with "
                f"datasets.load_dataset: {type(exc).__name__}: {str(exc)[:300]}"
            ) from None
    return out


def _load(path: str, subset: str | None, wanted: dict[str, str]) -> tuple[dict[str, Any], str]:
    """{config key (train_split, test_split): datasets.Dataset}, each non-empty, and
    where they came from."""
    quiet_datasets()
    local = Path(path).expanduser()
    if local.is_dir() and any((local / m).is_file() for m in SAVE_TO_DISK_MARKERS):
        found, source = _from_disk(local, wanted), str(local)
    else:
        found, source = _from_hub(path, subset, wanted), path + (f" ({subset})" if subset else "")
    for key, ds in found.items():
        if len(ds) == 0:
            raise DataError(f"dataset.{key}={wanted[key]!r}: the split of {source} is empty")
    return found, source


@lru_cache(maxsize=4)
def open_splits(
    path: str, subset: str | None, train: str, test: str | None, fraction: float
) -> tuple[Any, Any, str]:
    """(train, test) as `datasets.Dataset`s, images not decoded, and their source;
    opened once per process (the class count and the loader share it)."""
    wanted = {"train_split": train} | ({"test_split": test} if test is not None else {})
    found, source = _load(path, subset, wanted)
    train_ds = found["train_split"]
    if test is not None:
        return train_ds, found["test_split"], source
    n = len(train_ds)
    n_test = round(n * fraction)
    if not 1 <= n_test < n:
        raise DataError(
            f"dataset.test_fraction={fraction} of the {n} samples of {source}'s {train!r} "
            "split leaves no test or no training sample"
        )
    order = numpy_rng(0, "hf-test-split").permutation(n)
    held = np.sort(order[:n_test])
    kept = np.sort(order[n_test:])
    return train_ds.select(kept), train_ds.select(held), f"{source}, {n_test} held out as test"


KEYS = ("path", "subset", "image_key", "label_key", "owner_key", "train_split", "test_split")


def settings(cfg: dict) -> dict:
    """The hf keys of the `dataset` section, with the schema's defaults where absent."""
    from dataclasses import fields

    from fedkd.config.data import DatasetConfig

    wanted = (*KEYS, "test_fraction")
    return {f.name: cfg.get(f.name, f.default) for f in fields(DatasetConfig) if f.name in wanted}


def _open(cfg: dict) -> tuple[Any, Any, str]:
    if not cfg["path"]:
        raise DataError(
            "dataset=hf needs dataset.path: a Hugging Face dataset name or a directory "
            "written by save_to_disk"
        )
    test = cfg["test_split"]
    return open_splits(
        str(cfg["path"]),
        cfg["subset"],
        cfg["train_split"],
        None if test in (None, "") else str(test),
        float(cfg["test_fraction"]),
    )


def _require_columns(ds: Any, cfg: dict, source: str) -> None:
    for key in ("image_key", "label_key", "owner_key"):
        column = cfg.get(key)
        if column is None and key == "owner_key":
            continue
        if column not in ds.column_names:
            raise DataError(
                f"dataset.{key}={column!r} is not a column of {source}: its columns "
                f"are {', '.join(ds.column_names)}"
            )


def _column(ds: Any, key: str) -> np.ndarray:
    """One column of plain values (labels, owners) as an array, read as one arrow
    table (numpy formatting would build it row by row)."""
    table = ds.select_columns([key]).with_format("arrow")[:]
    return table.column(key).to_numpy()


def labels_of(train: Any, test: Any, key: str, source: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Both splits' labels as int64 0..K-1, and K (see the module docstring)."""
    from datasets import ClassLabel

    feature = train.features.get(key)
    what = f"{source} (dataset.label_key={key!r})"
    if isinstance(feature, ClassLabel):
        k = feature.num_classes
        ys = [_column(ds, key).astype(np.int64) for ds in (train, test)]
        for y in ys:
            if len(y) and (y.min() < 0 or y.max() >= k):
                raise DataError(f"{what}: ClassLabel ids outside 0..{k - 1} (missing labels?)")
        if k < 2:
            raise DataError(f"{what}: a ClassLabel of {k} class; a task needs at least 2")
        return ys[0], ys[1], k
    (y_train, y_test), k = class_ids([_column(train, key), _column(test, key)], what)
    return y_train, y_test, k


def _decode_all(ds: Any, key: str, what: str) -> np.ndarray:
    """Image features decode to PIL images (their mode says grey or colour); any other
    column (arrays of pixels) is read as numpy arrays of its own dtype."""
    from datasets import Image

    column = ds.select_columns([key])
    feature = ds.features[key]
    if not isinstance(feature, Image):
        while not hasattr(feature, "dtype") and hasattr(feature, "feature"):
            feature = feature.feature  # List / Sequence of pixel values
        dtype = getattr(feature, "dtype", type(feature).__name__)
        if dtype != "uint8":
            raise DataError(
                f"{what}: dataset.image_key={key!r} is a column of {dtype}; images are an "
                "Image feature or uint8 arrays (H, W), (H, W, C) or (C, H, W)"
            )
        column = column.with_format("numpy", dtype=np.uint8)  # else numpy widens to int64

    def images():
        row = 0
        for batch in column.iter(batch_size=BATCH):
            for image in batch[key]:
                where = f"{what} row {row}"
                if image is None:
                    raise DataError(f"{where}: no image (dataset.image_key={key!r})")
                yield decode_image(image, where), where
                row += 1

    return stack_images(images(), what)


def decoded(ds: Any, key: str, what: str) -> np.ndarray:
    """The images of column `key` as uint8 (N, C, H, W), from the cache when there."""
    fingerprint = getattr(ds, "_fingerprint", None)
    if not fingerprint:
        return _decode_all(ds, key, what)
    name = hashlib.sha1(f"{what}:{fingerprint}:{key}:{len(ds)}".encode()).hexdigest()[:20]
    return cached_array(
        CACHE_DIR / "hf" / f"{name}.npy",
        lambda: _decode_all(ds, key, what),
        fits=lambda x: x.dtype == np.uint8 and x.ndim == 4 and len(x) == len(ds),
    )


def _owners(train: Any, key: str | None) -> tuple[np.ndarray | None, tuple[str, ...]]:
    if key is None:
        return None, ()
    names, codes = np.unique(_column(train, key).astype(str), return_inverse=True)
    return codes.astype(np.int64).reshape(-1), tuple(str(n) for n in names)


def load_hf(section: dict) -> DatasetSplits:
    """The `dataset` section (name hf) as uint8 arrays; see the module docstring."""
    cfg = settings(section)
    train, test, source = _open(cfg)
    for ds in (train, test):
        _require_columns(ds, {**cfg, "owner_key": None} if ds is test else cfg, source)
    y_train, y_test, k = labels_of(train, test, cfg["label_key"], source)
    key = cfg["image_key"]
    x_train = decoded(train, key, f"{source} train")
    x_test = decoded(test, key, f"{source} test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{source}: train images are {x_train.shape[1:]} (C, H, W) but test images are "
            f"{x_test.shape[1:]}; both splits must share one shape"
        )
    owner, names = _owners(train, cfg["owner_key"])
    return DatasetSplits(
        "hf",
        ArrayDataset(x_train, y_train, owner),
        ArrayDataset(x_test, y_test),
        k,
        source,
        owner_names=names,
    )


@DATASETS.register("hf")
def _hf(cfg: dict) -> DatasetSplits:
    return load_hf(cfg)


@class_counter("hf")
def _hf_classes(dataset) -> int:
    """From the label feature or column: the dataset is opened (memory-mapped, or
    from the Hugging Face cache after the first download), no image is decoded."""
    cfg = settings(vars(dataset))
    train, test, source = _open(cfg)
    _require_columns(train, cfg, source)
    return labels_of(train, test, dataset.label_key, source)[2]

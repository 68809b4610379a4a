"""CIFAR-10 and CIFAR-100 from their Python-pickle directories, never unpickled freely.

    cifar-10-batches-py/   data_batch_1 .. data_batch_5, test_batch (batches.meta unused)
    cifar-100-python/      train, test (meta unused; the 100 fine labels are used)

The project's rule is "never unpickle untrusted files", and a pickle runs whatever
callable it names. `SafeUnpickler` allows only what a CIFAR batch is made of: numpy's
array reconstruction (ndarray, dtype, _reconstruct, _frombuffer, scalar) and
`_codecs.encode` (how Python 3 pickles bytes at protocol 2); dicts, lists, strings,
bytes and numbers need no callable at all. Anything else is refused with a DataError
before it is called. torchvision only downloads (download: true, when no directory is
found): the archive's md5 is checked and it is unpacked, and the batches are read here.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedkd.data.datasets import (
    DATASETS,
    DEFAULT_DOWNLOAD_ROOT,
    ArrayDataset,
    DatasetSplits,
    class_counter,
)
from fedkd.errors import DataError

ALLOWED = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class Layout(NamedTuple):
    """How one CIFAR variant is laid out on disk."""

    folder: str  # the batches directory's name
    train: tuple[str, ...]  # its training batch files
    test: tuple[str, ...]
    label_key: str  # the key of each batch's labels
    classes: int
    torchvision: str  # the torchvision.datasets class that knows its archive


LAYOUTS = {
    "cifar10": Layout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "labels",
        10,
        "CIFAR10",
    ),
    "cifar100": Layout("cifar-100-python", ("train",), ("test",), "fine_labels", 100, "CIFAR100"),
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the names in ALLOWED."""

    def __init__(self, file, where: str) -> None:
        super().__init__(file, encoding="latin1")  # CIFAR's batches are Python 2 pickles
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise DataError(
                f"{self.where}: refused to unpickle {module}.{name}: a CIFAR batch holds only "
                "numpy arrays, lists, dicts, strings and numbers (this file is damaged or "
                "not a CIFAR batch; it was not run)"
            )
        return super().find_class(module, name)


def read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: (uint8 (N, 3, 32, 32), int64 labels), checked."""
    try:
        with open(path, "rb") as f:
            entry = SafeUnpickler(f, str(path)).load()
    except DataError:
        raise
    except Exception as exc:  # a truncated or malformed pickle: any error of the format
        raise DataError(f"cannot read the CIFAR batch {path}: {exc!r}") from None
    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise DataError(
            f"{path}: a CIFAR batch is a dict with 'data' and {label_key!r}, not {keys}"
        )
    data, labels = entry["data"], np.asarray(entry[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path}: 'data' must be a uint8 array (N, 3072)")
    if data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise DataError(
            f"{path}: 'data' is {data.shape} and {label_key!r} holds {labels.shape}; "
            "expected (N, 3072) and N labels"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {label_key!r} must hold integer labels")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _split(folder: Path, files: tuple[str, ...], label_key: str, k: int) -> ArrayDataset:
    parts = [read_batch(folder / name, label_key) for name in files]
    y = np.concatenate([p[1] for p in parts])
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise DataError(f"{folder}: labels must lie in 0..{k - 1}, found {y.min()}..{y.max()}")
    return ArrayDataset(np.ascontiguousarray(np.concatenate([p[0] for p in parts])), y)


def _find(base: Path, layout: Layout) -> Path | None:
    for folder in (base, base / layout.folder):
        if all((folder / f).is_file() for f in (*layout.train, *layout.test)):
            return folder
    return None


def _download(base: Path, layout: Layout) -> str:
    """torchvision's downloader only: fetch the archive, check its md5, unpack it.
    Returns why it failed ('' when it did not)."""
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import download_and_extract_archive

    cls = getattr(tvd, layout.torchvision)
    try:
        download_and_extract_archive(cls.url, str(base), filename=cls.filename, md5=cls.tgz_md5)
    except Exception as exc:  # no network, mirror down, disk full: the caller reports it
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return ""


def load_cifar(name: str, root: str | None, download: bool) -> DatasetSplits:
    """CIFAR-10 or CIFAR-100 (fine labels) from dataset.root, either the batches
    directory itself or the directory holding it (default ~/.cache/fedkd/data)."""
    layout = LAYOUTS[name]
    base = Path(root).expanduser() if root else DEFAULT_DOWNLOAD_ROOT
    folder = _find(base, layout)
    failed = _download(base, layout) if folder is None and download else ""
    folder = folder or _find(base, layout)
    if folder is None:
        need = ", ".join((*layout.train, *layout.test))
        how = f"the download failed ({failed})" if download else "or set dataset.download=true"
        raise DataError(
            f"dataset.name={name!r}: no {layout.folder} under {base} (needs {need}); put it "
            f"there and set dataset.root, {how}"
        )
    train = _split(folder, layout.train, layout.label_key, layout.classes)
    test = _split(folder, layout.test, layout.label_key, layout.classes)
    return DatasetSplits(name, train, test, layout.classes, str(folder))


@DATASETS.register("cifar10")
def _cifar10(cfg: dict) -> DatasetSplits:
    return load_cifar("cifar10", cfg.get("root"), bool(cfg.get("download", False)))


@DATASETS.register("cifar100")
def _cifar100(cfg: dict) -> DatasetSplits:
    return load_cifar("cifar100", cfg.get("root"), bool(cfg.get("download", False)))


@class_counter("cifar10")
@class_counter("cifar100")
def _classes(dataset) -> int:
    return LAYOUTS[dataset.name].classes

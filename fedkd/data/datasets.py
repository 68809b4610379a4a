"""Image datasets as uint8 arrays in memory: the registry, Fashion-MNIST, synthetic.

Every loader returns `DatasetSplits` with images shaped (N, C, H, W). Fashion-MNIST
is read from a configured root, then Debian's `dataset-fashion-mnist` package
(/usr/share/datasets/fashion-mnist), and only then downloaded with torchvision.
The other built-in datasets register themselves from their own modules: CIFAR-10/100
(fedkd.data.cifar), image folders (fedkd.data.image_folder) and any Hugging Face
dataset through flwr-datasets (fedkd.data.hf); docs/datasets.md describes them all.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedkd.data.array_cache import cached_array
from fedkd.errors import DataError
from fedkd.registry import Registry
from fedkd.seeding import numpy_rng

if TYPE_CHECKING:
    from fedkd.config import DatasetConfig

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DOWNLOAD_ROOT = Path(os.environ.get("FEDKD_DATA", "~/.cache/fedkd/data")).expanduser()
CACHE_DIR = Path(os.environ.get("FEDKD_CACHE", "~/.cache/fedkd/cache")).expanduser()


@dataclass(frozen=True)
class ArrayDataset:
    x: np.ndarray  # uint8, (N, C, H, W)
    y: np.ndarray  # int64, (N,)
    # int64 (N,): each sample's owner (writer, user) as an index into
    # DatasetSplits.owner_names; None where the dataset names no owners
    owner: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class DatasetSplits:
    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    source: str  # where the data came from, for the log
    owner_names: tuple[str, ...] = ()  # the values of the owner column, sorted

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]


# every module of the package is imported on first lookup: a module that defines a
# dataset (fedkd/data/cifar.py, hf.py, image_folder.py) registers it, no list to edit
_MODULES = ("fedkd.data",)

# dataset.name -> a loader of the `dataset` config section
DATASETS: Registry[Callable[[dict], DatasetSplits]] = Registry(
    "dataset", "dataset.name", modules=_MODULES
)
# dataset.name -> its number of classes from the typed `dataset` section, found
# without decoding the images (see num_classes_of)
CLASS_COUNTS: Registry[Callable[[DatasetConfig], int]] = Registry(
    "dataset", "dataset.name", modules=_MODULES
)


def class_counter(name: str) -> Callable:
    """Decorator: register how dataset `name` counts its classes without loading."""
    return CLASS_COUNTS.register(name)


# ---------------------------------------------------------------------- Fashion-MNIST

_FMNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), checking its header against its size.

    The decoded array is cached as .npy next to the download root, keyed by the
    file's path, size and modification time, so later processes skip the gunzip.
    """
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if st.st_size < 1_000_000:  # small files decode faster than a cache lookup pays
        return _decode_idx(path)
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = CACHE_DIR / f"{path.name.split('.')[0]}-{key}.npy"
    return cached_array(cached, lambda: _decode_idx(path))


def _decode_idx(path: Path) -> np.ndarray:
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header of {ndim} dimensions is incomplete)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(
            f"{path} is corrupt: header says {shape} ({expected} bytes), "
            f"file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find_idx_dir(candidates: list[Path]) -> Path | None:
    for folder in candidates:
        if all(_idx_path(folder, stem) is not None for stem in _FMNIST_FILES.values()):
            return folder
    return None


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _fmnist_candidates(root: str | None) -> list[Path]:
    found: list[Path] = []
    if root:
        base = Path(root).expanduser()
        found += [base, base / "fashion-mnist", base / "FashionMNIST" / "raw"]
    found.append(SYSTEM_FASHION_MNIST)
    found.append(DEFAULT_DOWNLOAD_ROOT / "FashionMNIST" / "raw")
    return found


def load_fashion_mnist(root: str | None, download: bool, **_: object) -> DatasetSplits:
    candidates = _fmnist_candidates(root)
    folder = _find_idx_dir(candidates)
    if folder is None and download:
        folder = _download_fashion_mnist(Path(root).expanduser() if root else DEFAULT_DOWNLOAD_ROOT)
    if folder is None:
        searched = ", ".join(str(c) for c in candidates)
        raise DataError(
            f"dataset.name='fashion_mnist': files not found (searched {searched}); "
            "install them with `apt-get install dataset-fashion-mnist` or set dataset.root"
        )
    arrays = {k: read_idx(_idx_path(folder, stem)) for k, stem in _FMNIST_FILES.items()}  # type: ignore[arg-type]
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"Fashion-MNIST {split} files in {folder} disagree: "
                f"images {x.shape}, labels {y.shape}"
            )
        if y.max(initial=0) > 9:
            raise DataError(f"Fashion-MNIST {split} labels in {folder} hold values above 9")
    return DatasetSplits(
        name="fashion_mnist",
        train=ArrayDataset(arrays["train_x"][:, None], arrays["train_y"].astype(np.int64)),
        test=ArrayDataset(arrays["test_x"][:, None], arrays["test_y"].astype(np.int64)),
        num_classes=10,
        source=str(folder),
    )


@DATASETS.register("fashion_mnist")
def _fashion_mnist(cfg: dict) -> DatasetSplits:
    return load_fashion_mnist(root=cfg.get("root"), download=cfg.get("download", True))


def _download_fashion_mnist(root: Path) -> Path | None:
    """Last resort: torchvision's downloader (needs network access)."""
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception:  # no network, mirror down, disk full: the caller reports it
        return None
    return _find_idx_dir([root / "FashionMNIST" / "raw"])


# -------------------------------------------------------------------------- synthetic


def load_synthetic(
    num_classes: int,
    channels: int,
    image_size: int,
    train_size: int,
    test_size: int,
    noise: float,
    seed: int,
    **_: object,
) -> DatasetSplits:
    """Each class is a smooth random prototype image; samples add Gaussian noise."""
    rng = numpy_rng(seed, "synthetic-prototypes")
    coarse = rng.uniform(0, 1, size=(num_classes, channels, 4, 4))
    reps = -(-image_size // 4)
    protos = np.kron(coarse, np.ones((1, 1, reps, reps)))[..., :image_size, :image_size]

    def sample(n: int, tag: str) -> ArrayDataset:
        r = numpy_rng(seed, "synthetic", tag)
        y = r.integers(0, num_classes, size=n)
        x = protos[y] + r.normal(0, noise, size=(n, channels, image_size, image_size))
        return ArrayDataset((np.clip(x, 0, 1) * 255).astype(np.uint8), y.astype(np.int64))

    return DatasetSplits(
        "synthetic",
        sample(train_size, "train"),
        sample(test_size, "test"),
        num_classes,
        "generated",
    )


@DATASETS.register("synthetic")
def _synthetic(cfg: dict) -> DatasetSplits:
    return load_synthetic(**cfg["synthetic"])


@class_counter("synthetic")
def _synthetic_classes(dataset: DatasetConfig) -> int:
    return dataset.synthetic.num_classes


@class_counter("fashion_mnist")
def _ten_classes(dataset: DatasetConfig) -> int:
    return 10


def num_classes_of(dataset: DatasetConfig) -> int:
    """The number of classes of the `dataset` section, without decoding its images:
    from the config (synthetic), a constant (Fashion-MNIST, CIFAR), the class
    directories (folder) or the label feature or column (hf: see fedkd.data.hf).
    A plugin dataset that registers no counter is loaded to find out."""
    if dataset.name in CLASS_COUNTS:
        return CLASS_COUNTS.get(dataset.name)(dataset)
    from dataclasses import asdict

    return load_dataset(asdict(dataset)).num_classes


def list_datasets() -> list[str]:
    return DATASETS.names()


def load_dataset(cfg: dict) -> DatasetSplits:
    """Load `cfg` (the `dataset` section of the config) as uint8 arrays."""
    return DATASETS.get(cfg["name"])(cfg)


def public_channel_stats(public: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) in [0, 1] of public uint8 images (N, C, H, W).

    Only public data may set them: statistics of the training split would be a
    release of the private shards that no accountant counts. Without public images,
    fixed constants (0.5, 0.25): a coarser scaling, but nothing leaks."""
    if len(public) == 0:
        channels = public.shape[1]
        return np.full(channels, 0.5), np.full(channels, 0.25)
    flat = public.transpose(1, 0, 2, 3).reshape(public.shape[1], -1)
    return flat.mean(axis=1) / 255.0, flat.std(axis=1) / 255.0 + 1e-6

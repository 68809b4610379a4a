"""Small datasets written in the real on-disk formats, for the dataset tests: a
`save_to_disk` directory with a writer column, parquet files as on the hub, an image
folder, and CIFAR-10/100 pickle directories. Each class is a distinct brightness
pattern plus noise, so a model can learn them in a round or two."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

WRITERS = 6
CLASSES = 4


def images(n: int, seed: int, channels: int, size: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, size, size, channels) images and labels 0..CLASSES-1."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    base = np.linspace(30, 220, CLASSES)[y][:, None, None, None]
    stripes = (np.arange(size) % (y[:, None] + 2) == 0)[:, None, :, None] * 40
    x = base + stripes + rng.normal(0, 12, (n, size, size, channels))
    return np.clip(x, 0, 255).astype(np.uint8), y


def write_hf(
    root: Path, n_train: int = 300, n_test: int = 80, channels: int = 1, fmt: str = "disk"
) -> Path:
    """A DatasetDict (train, test) with columns image (PIL), label (ClassLabel) and
    writer (string, w0..w5): saved with save_to_disk (fmt='disk') or as parquet files
    in a hub repository's layout (fmt='parquet', read by datasets.load_dataset)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    from datasets import Image as HFImage
    from PIL import Image

    features = Features(
        {
            "image": HFImage(),
            "label": ClassLabel(names=[f"c{i}" for i in range(CLASSES)]),
            "writer": Value("string"),
        }
    )
    parts = {}
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        x, y = images(n, seed, channels)
        pil = [Image.fromarray(a[..., 0] if channels == 1 else a) for a in x]
        writers = [f"w{i % WRITERS}" for i in range(n)]
        parts[split] = Dataset.from_dict(
            {"image": pil, "label": y.tolist(), "writer": writers}, features=features
        )
    dd = DatasetDict(parts)
    if fmt == "disk":
        dd.save_to_disk(str(root))
    else:
        (root / "data").mkdir(parents=True)
        for split, ds in dd.items():
            ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def write_folder(root: Path, n_train: int = 200, n_test: int = 60, channels: int = 3) -> Path:
    """root/train/<class>/NNN.png and root/test/<class>/NNN.png."""
    from PIL import Image

    for split, n, seed in (("train", n_train, 3), ("test", n_test, 4)):
        x, y = images(n, seed, channels)
        for i, (a, label) in enumerate(zip(x, y, strict=True)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a[..., 0] if channels == 1 else a).save(folder / f"{i:04d}.png")
    return root


def write_cifar(root: Path, n_per_batch: int = 60, hundred: bool = False) -> Path:
    """A cifar-10-batches-py (or cifar-100-python) directory of small batches, pickled
    as the real ones are: dicts of a uint8 (N, 3072) array and a list of labels."""
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    batches = tuple(f"data_batch_{i}" for i in range(1, 6))
    names = ("train", "test") if hundred else (*batches, "test_batch")
    key = "fine_labels" if hundred else "labels"
    for seed, name in enumerate(names):
        x, y = images(n_per_batch, 10 + seed, 3, size=32)
        entry = {
            "batch_label": name,
            key: y.tolist(),
            "data": np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(len(x), -1),
            "filenames": [f"img_{i}.png" for i in range(len(x))],
        }
        if hundred:
            entry["coarse_labels"] = [0] * len(x)
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f, protocol=2)
    return folder


class _Boom:
    """Unpickling this calls os.system(command)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def write_malicious(path: Path, marker: Path) -> None:
    """A CIFAR-looking batch whose unpickling would run `touch marker`."""
    entry = {"data": _Boom(f"touch {marker}"), "labels": [0]}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)

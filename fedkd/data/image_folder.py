"""Image folders: one sub-directory of images per class, named by the class index.

    root/train/0/*.png  root/train/1/*.png ...   (dataset=folder)
    root/test/0/*.png   root/test/1/*.png ...
    data/0/*.png        data/1/*.png ...         (a device's own data, data-path=...)

`read_image_folder` is the one reader of this format. Without a target shape (a
dataset) every image must already share one shape; with one (a device, which must
match the federation) images are converted to its channels and resized to its size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedkd.data.datasets import DATASETS, ArrayDataset, DatasetSplits, class_counter
from fedkd.data.images import decode_image, stack_images
from fedkd.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def class_dirs(p: Path) -> list[Path]:
    """The class sub-directories of `p`, in class order; each named by its index."""
    if not p.is_dir():
        raise DataError(f"{p} is not a directory (expected a sub-directory per class: 0/, 1/ ...)")
    subs = sorted(d for d in p.iterdir() if d.is_dir())  # by name, as devices always read them
    bad = [d for d in subs if not d.name.isdigit()]
    if bad:
        raise DataError(f"{bad[0]}: class directories are named by class index (0, 1, ...)")
    return subs


def _decoded(f: Path, shape: tuple[int, int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as img:
            if shape is None:
                return decode_image(img, str(f))
            c, h, w = shape
            img = img.convert("L" if c == 1 else "RGB").resize((w, h))
            return np.asarray(img, np.uint8).reshape(h, w, c).transpose(2, 0, 1)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read the image {f}: {exc}") from None


def read_image_folder(
    p: Path, shape: tuple[int, int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images under p/<class index>/ as uint8 (N, C, H, W) and int64 labels, in
    (class, file name) order. `shape`: convert and resize every image to it; None:
    decode as stored (grey -> C=1, colour -> C=3), all in one shape."""
    labels: list[int] = []

    def images():
        for sub in class_dirs(p):
            for f in sorted(sub.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    labels.append(int(sub.name))
                    yield _decoded(f, shape), str(f)

    try:
        x = stack_images(images(), str(p))
    except DataError as exc:
        if "holds no images" not in str(exc):
            raise
        raise DataError(f"{p}: no images found in class sub-directories (0/, 1/, ...)") from None
    return x, np.array(labels, np.int64)


def folder_classes(root: Path) -> int:
    """The number of classes of a dataset folder: its train split's class directories,
    which must be 0..K-1 with none missing."""
    names = sorted(int(d.name) for d in class_dirs(root / "train"))
    missing = sorted(set(range(max(names, default=-1) + 1)) - set(names))
    if missing or len(names) < 2:
        raise DataError(
            f"{root / 'train'}: class directories must be 0..K-1 with K >= 2 "
            f"(found {names[:10]}{', missing ' + str(missing[:5]) if missing else ''})"
        )
    return len(names)


def _root(path: str | None) -> Path:
    if not path:
        raise DataError("dataset=folder needs dataset.path: a directory with train/ and test/")
    root = Path(path).expanduser()
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(
                f"dataset.path={path!r}: no {split}/ directory in it (expected "
                f"{root}/train/<class index>/*.png and {root}/test/<class index>/*.png)"
            )
    return root


def load_folder(path: str | None, **_: object) -> DatasetSplits:
    root = _root(path)
    k = folder_classes(root)
    train, test = (read_image_folder(root / s) for s in ("train", "test"))
    if train[0].shape[1:] != test[0].shape[1:]:
        raise DataError(
            f"{root}: train images are {train[0].shape[1:]} (C, H, W) but test images are "
            f"{test[0].shape[1:]}; both splits must share one shape"
        )
    if test[1].max() >= k:
        raise DataError(
            f"{root / 'test'}: class {test[1].max()} has no train/ directory (0..{k - 1})"
        )
    return DatasetSplits("folder", ArrayDataset(*train), ArrayDataset(*test), k, str(root))


@DATASETS.register("folder")
def _folder(cfg: dict) -> DatasetSplits:
    return load_folder(cfg.get("path"))


@class_counter("folder")
def _folder_classes(dataset) -> int:
    return folder_classes(_root(dataset.path))

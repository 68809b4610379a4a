"""Decoding images of any source to uint8 (C, H, W), stacking them with one shape
check, and turning label values into class ids 0..K-1: the one place for these, used
by image folders (fedkd.data.image_folder) and Hugging Face datasets (fedkd.data.hf).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np

from fedkd.errors import DataError

# PIL modes decoded as one grey channel; every other mode becomes RGB (alpha dropped)
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def decode_image(image: object, where: str) -> np.ndarray:
    """A PIL image or an array of pixels as uint8 (C, H, W): grey -> C=1, colour -> C=3.

    Arrays must be uint8, shaped (H, W), (H, W, C) or (C, H, W) with C in 1 or 3."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        grey = image.mode in GREY_MODES
        arr = np.asarray(image.convert("L" if grey else "RGB"), np.uint8)
        return arr[None] if grey else arr.transpose(2, 0, 1)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise DataError(f"{where}: pixels must be uint8 (0-255), got {arr.dtype}")
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3 and arr.shape[-1] in (1, 3):
        return arr.transpose(2, 0, 1)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        return arr
    raise DataError(
        f"{where}: an image of shape {arr.shape}; allowed are (H, W), (H, W, C) or "
        "(C, H, W) with C = 1 or 3"
    )


def stack_images(images: Iterable[tuple[np.ndarray, str]], what: str) -> np.ndarray:
    """(C, H, W) arrays, each with where it came from, as one (N, C, H, W) array;
    every image must have the first one's shape (DataError naming the first that does not)."""
    out: list[np.ndarray] = []
    first = ""
    for arr, where in images:
        if out and arr.shape != out[0].shape:
            raise DataError(
                f"{what}: {where} is {_shape(arr)} but {first} is {_shape(out[0])}; all "
                "images of a dataset must share one shape (resize them, or convert them "
                "all to grey or all to RGB)"
            )
        if not out:
            first = where
        out.append(arr)
    if not out:
        raise DataError(f"{what}: holds no images")
    return np.ascontiguousarray(np.stack(out))


def _shape(arr: np.ndarray) -> str:
    c, h, w = arr.shape
    return f"{'grey' if c == 1 else 'RGB'} {h}x{w}"


def class_ids(values: list[np.ndarray], what: str) -> tuple[list[np.ndarray], int]:
    """Label values of several splits -> int64 ids 0..K-1 and K: the sorted distinct
    values over all splits, in order (integers 0..K-1 keep their value)."""
    flat = np.concatenate([np.asarray(v) for v in values])
    if flat.dtype.kind not in "iub" and flat.dtype.kind not in "US":
        flat = flat.astype(str)  # mixed or object labels: compared as text
    try:
        distinct, inverse = np.unique(flat, return_inverse=True)
    except TypeError as exc:
        raise DataError(f"{what}: labels that cannot be sorted ({exc})") from None
    if len(distinct) < 2:
        raise DataError(f"{what}: {len(distinct)} distinct label(s); a task needs at least 2")
    bounds = np.cumsum([0, *(len(v) for v in values)])
    ids = inverse.astype(np.int64).reshape(-1)
    return [ids[a:b] for a, b in itertools.pairwise(bounds)], len(distinct)

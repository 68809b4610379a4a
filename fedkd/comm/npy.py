"""Flower `Array`s to and from numpy, byte for byte as Flower does it, without its
per-array cost.

A Flower `Array` holds its values as an .npy file (`np.save` / `np.load`). Parsing an
.npy header costs about 0.1 ms (numpy reads it with `ast.literal_eval`), and a
model's reply has one array per layer: at 1,000 clients a round that is seconds on
the server. A well-formed array of a known dtype and shape always carries the same
header, so these functions compare the header bytes and read or write the values
directly; anything else (another layout, a malformed or hostile header, a wrong
length) takes numpy's own path, with numpy's own errors.
"""

from __future__ import annotations

from io import BytesIO
from math import prod

import numpy as np
from flwr.app import Array

NUMPY = "numpy.ndarray"  # Flower's SType.NUMPY
_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The header `np.save` writes before C-ordered values of this dtype and shape."""
    dtype = np.dtype(dtype)
    key = (dtype.str, tuple(shape))
    if key not in _HEADERS:
        buf = BytesIO()
        np.save(buf, np.zeros(shape, dtype), allow_pickle=False)
        data = buf.getvalue()
        _HEADERS[key] = data[: len(data) - dtype.itemsize * prod(shape)]
    return _HEADERS[key]


def array_from_numpy(values: np.ndarray) -> Array:
    """`Array.from_numpy_ndarray(values)`, the same bytes."""
    if values.dtype.hasobject or (values.flags.f_contiguous and not values.flags.c_contiguous):
        return Array.from_numpy_ndarray(values)  # np.save writes these differently
    header = npy_header(values.dtype, values.shape)
    data = b"".join((header, np.ascontiguousarray(values).data))  # one copy of the values
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype=NUMPY, data=data)


def array_to_numpy(array: Array, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """`array.numpy()` (a new, writable array); fast when it holds exactly the .npy of
    `dtype` and `shape`, numpy's own parsing (and errors) otherwise."""
    data = array.data
    header = npy_header(dtype, shape)
    size = np.dtype(dtype).itemsize * prod(shape)
    if array.stype == NUMPY and len(data) == len(header) + size and data.startswith(header):
        return np.frombuffer(data, dtype, offset=len(header)).reshape(shape).copy()
    return array.numpy()

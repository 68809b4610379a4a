"""Payload codecs for soft labels (teacher -> clients) and logits (clients -> server).

A codec turns an (n, C) float tensor into the arrays of an ArrayRecord and back, and
checks a received record before anything is decoded. Bytes are counted by Flower's
own `ArrayRecord.count_bytes()` (serialized arrays plus keys), so the numbers are
what the records carry.

| codec   | per value        | decoded as |
|---------|------------------|------------|
| float32 | 4 bytes          | itself |
| float16 | 2 bytes          | itself (saturating instead of overflowing to inf) |
| int8    | 1 byte + 8 bytes per record | affine: lo + q * (hi - lo) / 255 |
| onebit  | 1 bit (packed)   | the argmax as a smoothed one-hot (compressed FD, Sattler et al.) |

`kind` says what the values are: "probs" (a distribution per row) or "logits"; the
1-bit code keeps only the argmax and decodes it back to the same kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedkd.protocol import LOGITS, InvalidReply, check_array

_FLOAT16_MAX = float(np.finfo(np.float16).max)
VALUE_BOUND = _FLOAT16_MAX  # no decoded value may exceed it in magnitude, in any codec
SMOOTHING = 0.05  # mass spread over the other classes when decoding a 1-bit label


class Codec:
    name = "float32"
    dtype = np.float32

    def keys(self, key: str) -> set[str]:
        """The arrays a record of this codec holds."""
        return {key}

    def encode(self, values: torch.Tensor, key: str, kind: str = "logits") -> ArrayRecord:
        v = values.detach().float().cpu()
        return ArrayRecord({key: Array(v.numpy().astype(self.dtype))})

    def check(self, record: ArrayRecord, key: str, shape: tuple[int, int]) -> None:
        values = check_array(record, key, shape, np.dtype(self.dtype))
        if values.size and float(np.abs(values).max()) > VALUE_BOUND:
            raise InvalidReply(f"array {key!r} holds values beyond +-{VALUE_BOUND:g}")

    def decode(
        self, record: ArrayRecord, key: str, shape: tuple[int, int], kind: str
    ) -> torch.Tensor:
        return torch.from_numpy(record[key].numpy().astype(np.float32))


class Float16(Codec):
    name = "float16"
    dtype = np.float16

    def encode(self, values: torch.Tensor, key: str, kind: str = "logits") -> ArrayRecord:
        v = values.detach().float().cpu().clamp(-_FLOAT16_MAX, _FLOAT16_MAX).to(torch.float16)
        return ArrayRecord({key: Array(v.numpy())})


class Int8(Codec):
    """Affine 8-bit quantisation with one (lo, hi) range per record."""

    name = "int8"

    def keys(self, key: str) -> set[str]:
        return {key, f"{key}-range"}

    def encode(self, values: torch.Tensor, key: str, kind: str = "logits") -> ArrayRecord:
        v = values.detach().float().cpu()
        lo, hi = (float(v.min()), float(v.max())) if v.numel() else (0.0, 0.0)
        scale = (hi - lo) / 255 or 1.0
        q = torch.round((v - lo) / scale).clamp(0, 255).to(torch.uint8)
        rng = np.array([lo, hi], np.float32)
        return ArrayRecord({key: Array(q.numpy()), f"{key}-range": Array(rng)})

    def check(self, record: ArrayRecord, key: str, shape: tuple[int, int]) -> None:
        check_array(record, key, shape, np.dtype(np.uint8))
        lo, hi = check_array(record, f"{key}-range", (2,), np.dtype(np.float32))
        if not -VALUE_BOUND <= lo <= hi <= VALUE_BOUND:  # finite, so decoding stays finite
            raise InvalidReply(f"array {key!r}-range [{lo}, {hi}] is not within +-{VALUE_BOUND:g}")

    def decode(
        self, record: ArrayRecord, key: str, shape: tuple[int, int], kind: str
    ) -> torch.Tensor:
        q = torch.from_numpy(record[key].numpy().astype(np.float32))
        lo, hi = (float(x) for x in record[f"{key}-range"].numpy())
        return lo + q * ((hi - lo) / 255)


class OneBit(Codec):
    """One bit per value: the argmax of each row as a packed one-hot bitmap."""

    name = "onebit"

    def encode(self, values: torch.Tensor, key: str, kind: str = "logits") -> ArrayRecord:
        n, c = values.shape
        onehot = np.zeros((n, c), np.uint8)
        onehot[np.arange(n), values.detach().argmax(1).cpu().numpy()] = 1
        return ArrayRecord({key: Array(np.packbits(onehot.reshape(-1)))})

    def check(self, record: ArrayRecord, key: str, shape: tuple[int, int]) -> None:
        n, c = shape
        bits = check_array(record, key, (math.ceil(n * c / 8),), np.dtype(np.uint8))
        rows = np.unpackbits(bits)[: n * c].reshape(n, c)
        if n and not (rows.sum(1) == 1).all():
            raise InvalidReply(f"array {key!r} is not one bit set per row")

    def decode(
        self, record: ArrayRecord, key: str, shape: tuple[int, int], kind: str
    ) -> torch.Tensor:
        n, c = shape
        rows = np.unpackbits(record[key].numpy())[: n * c].reshape(n, c).astype(np.float32)
        probs = torch.from_numpy(rows * (1 - SMOOTHING) + (1 - rows) * SMOOTHING / max(c - 1, 1))
        return probs if kind == "probs" else probs.log()


CODECS: dict[str, Codec] = {c.name: c for c in (Codec(), Float16(), Int8(), OneBit())}


def encode(values: torch.Tensor, codec: str, key: str, kind: str = "logits") -> ArrayRecord:
    return CODECS[codec].encode(values, key, kind)


def check(record: ArrayRecord, codec: str, key: str, shape: tuple[int, int]) -> None:
    """Raise InvalidReply unless `record` holds a well-formed (n, C) payload and
    nothing else."""
    expected = CODECS[codec].keys(key)
    if set(record.keys()) != expected:
        raise InvalidReply(f"record holds arrays {sorted(record.keys())}, not {sorted(expected)}")
    CODECS[codec].check(record, key, shape)


def decode(
    record: ArrayRecord, key: str, codec: str, shape: tuple[int, int], kind: str = "logits"
) -> torch.Tensor:
    """Back to float32 (n, C). Check the record first: decoding trusts it."""
    return CODECS[codec].decode(record, key, shape, kind)


def recode(
    record: ArrayRecord,
    codec: str,
    shape: tuple[int, int],
    transform: Callable[[torch.Tensor], torch.Tensor],
) -> ArrayRecord:
    """Decode an upload's logits, transform them, encode them again with its codec
    (what a client-side mod or an injected fault does to a reply)."""
    return encode(transform(decode(record, LOGITS, codec, shape)), codec, LOGITS)


def payload_bytes(record: ArrayRecord | None) -> int:
    return 0 if record is None else record.count_bytes()

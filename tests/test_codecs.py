"""Payload codecs: exact byte counts, round trips within each codec's precision,
and malformed payloads rejected before anything is decoded."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedkd.comm.codecs import CODECS, SMOOTHING, check, decode, encode, payload_bytes
from fedkd.protocol import InvalidReply

N, C = 50, 10
SHAPE = (N, C)


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(N, C, generator=torch.Generator().manual_seed(0)) * 4


@pytest.mark.parametrize("codec", list(CODECS))
def test_round_trip_passes_its_own_check(codec, logits):
    record = encode(logits, codec, "x")
    check(record, codec, "x", SHAPE)
    out = decode(record, "x", codec, SHAPE)
    assert out.shape == SHAPE and out.dtype == torch.float32
    if codec in ("float32", "onebit"):  # exact, or exact by construction
        assert torch.equal(out.argmax(1), logits.argmax(1))


@pytest.mark.parametrize(("codec", "tol"), [("float32", 0.0), ("float16", 1e-2), ("int8", None)])
def test_value_precision(codec, tol, logits):
    out = decode(encode(logits, codec, "x"), "x", codec, SHAPE)
    if tol is None:  # int8: half a quantisation step of the record's range
        tol = float(logits.max() - logits.min()) / 255 / 2 + 1e-6
    assert (out - logits).abs().max().item() <= tol


def test_payload_bytes_scale_with_bits_per_value(logits):
    sizes = {c: payload_bytes(encode(logits, c, "x")) for c in CODECS}
    values = N * C
    # Flower counts array bytes plus keys and small headers: compare the array part.
    overhead = sizes["float32"] - 4 * values
    assert 0 <= overhead < 200
    assert sizes["float16"] - 2 * values == overhead
    assert sizes["onebit"] <= values // 8 + overhead + 8
    assert values < sizes["int8"] < values + 2 * overhead + 8 + 50
    assert payload_bytes(None) == 0


def test_onebit_decodes_to_smoothed_one_hot(logits):
    probs = decode(encode(logits, "onebit", "x"), "x", "onebit", SHAPE, kind="probs")
    assert torch.allclose(probs.sum(1), torch.ones(N))
    assert torch.allclose(probs.max(1).values, torch.full((N,), 1 - SMOOTHING))
    as_logits = decode(encode(logits, "onebit", "x"), "x", "onebit", SHAPE, kind="logits")
    assert torch.allclose(as_logits.softmax(1), probs, atol=1e-6)


def test_float16_saturates_instead_of_inf():
    big = torch.tensor([[1e6, -1e6]])
    out = decode(encode(big, "float16", "x"), "x", "float16", (1, 2))
    assert torch.isfinite(out).all()


def test_int8_constant_input_round_trips():
    const = torch.full((3, 4), 2.5)
    out = decode(encode(const, "int8", "x"), "x", "int8", (3, 4))
    assert torch.allclose(out, const)


MALFORMED = {
    "missing key": ("float16", ArrayRecord({"y": Array(np.zeros(SHAPE, np.float16))})),
    "wrong dtype": ("float16", ArrayRecord({"x": Array(np.zeros(SHAPE, np.float32))})),
    "wrong shape": ("float32", ArrayRecord({"x": Array(np.zeros((N, C + 1), np.float32))})),
    "nan": ("float32", ArrayRecord({"x": Array(np.full(SHAPE, np.nan, np.float32))})),
    "inf": ("float16", ArrayRecord({"x": Array(np.full(SHAPE, np.inf, np.float16))})),
    "int8 no range": ("int8", ArrayRecord({"x": Array(np.zeros(SHAPE, np.uint8))})),
    "int8 reversed range": (
        "int8",
        ArrayRecord(
            {"x": Array(np.zeros(SHAPE, np.uint8)), "x-range": Array(np.array([1, 0], np.float32))}
        ),
    ),
    "int8 nan range": (
        "int8",
        ArrayRecord(
            {
                "x": Array(np.zeros(SHAPE, np.uint8)),
                "x-range": Array(np.array([np.nan, 0], np.float32)),
            }
        ),
    ),
    "onebit short": ("onebit", ArrayRecord({"x": Array(np.zeros(3, np.uint8))})),
    "onebit two bits in a row": (
        "onebit",
        ArrayRecord({"x": Array(np.full(N * C // 8 + (N * C % 8 > 0), 255, np.uint8))}),
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_payload_is_rejected(case):
    codec, record = MALFORMED[case]
    with pytest.raises(InvalidReply):
        check(record, codec, "x", SHAPE)


def test_undecodable_bytes_are_rejected():
    arr = Array(np.zeros(SHAPE, np.float16))
    arr.data = b"\x00garbage"  # what a broken client might send
    with pytest.raises(InvalidReply, match="cannot be decoded"):
        check(ArrayRecord({"x": arr}), "float16", "x", SHAPE)

"""The wire format: encode/decode round trips against independent references, and every
malformed input answered with the right status and a message naming expected vs got."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch

from monitor.transport.wire import (
    ProtocolError,
    bfloat16_to_float32,
    decode_batch,
    encode_batch,
    float32_to_bfloat16,
    lowered,
)

RAW = "application/octet-stream"
NPY = "application/x-npy"


def _rows(b: int = 7, d: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, d)).astype(np.float32) * 3


def _raw_headers(dtype: str = "float32", shape: str = "7,5", **extra: str) -> dict[str, str]:
    return {"Content-Type": RAW, "X-Repwatch-Dtype": dtype, "X-Repwatch-Shape": shape, **extra}


def _npy(arr: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, **kw)  # type: ignore[arg-type]
    return buf.getvalue()


def _status(headers: dict[str, str], body: bytes, **kw: int) -> tuple[int, str]:
    with pytest.raises(ProtocolError) as info:
        decode_batch(headers, body, **kw)
    return info.value.status, info.value.message


# ---------------------------------------------------------------------- round trips

def test_float32_round_trip_is_exact_with_labels_and_step() -> None:
    x = _rows()
    labels = np.arange(7, dtype=np.int64) * 3 - 4                   # negatives travel too
    headers, body = encode_batch(x, labels=labels, step=42)
    assert headers == {"Content-Type": RAW, "X-Repwatch-Dtype": "float32",
                       "X-Repwatch-Shape": "7,5", "X-Repwatch-Labels": "int64",
                       "X-Repwatch-Step": "42"}
    # independent layout reference: struct little-endian floats, then int64s
    assert body == struct.pack("<35f", *x.ravel().tolist()) + struct.pack("<7q", *labels.tolist())
    rows, lab, step = decode_batch(headers, body)
    assert rows.dtype == np.float32 and rows.shape == (7, 5) and rows.flags.c_contiguous
    np.testing.assert_array_equal(rows, x)
    assert lab is not None and lab.dtype == np.int64
    np.testing.assert_array_equal(lab, labels)
    assert step == 42
    rows[0, 0] = 1.0                                               # a writable copy, not the body


def test_lowered_headers_are_made_once_and_looked_up_case_insensitively() -> None:
    x = _rows()
    headers, body = encode_batch(x, step=3)
    low = lowered({**headers, "X-Extra": "A"})
    assert lowered(low) is low                                     # not lowered again
    assert dict(low)["x-repwatch-shape"] == "7,5" and "X-Repwatch-Shape" not in dict(low)
    assert low.get("X-REPWATCH-SHAPE") == "7,5" and low["X-Extra"] == "A"
    assert "x-extra" in low and "X-EXTRA" in low and "nope" not in low and 3 not in low
    assert low.get("missing", "d") == "d"
    rows, _, step = decode_batch(low, body)
    np.testing.assert_array_equal(rows, x)
    assert step == 3


def test_owned_float32_bodies_are_decoded_without_a_copy() -> None:
    """``owned=True`` (the HTTP ingest's own buffer): float32 rows are a view on it; anything
    else (bytes, a shared memoryview, another dtype) is still copied."""
    x = _rows()
    labels = np.arange(7, dtype=np.int64)
    headers, body = encode_batch(x, labels=labels)
    buf = bytearray(body)
    rows, lab, _ = decode_batch(headers, buf, owned=True)
    np.testing.assert_array_equal(rows, x)
    np.testing.assert_array_equal(lab, labels)
    assert np.shares_memory(rows, np.frombuffer(buf, np.uint8))
    assert rows.flags.writeable and rows.flags.aligned and rows.flags.c_contiguous
    assert not np.shares_memory(lab, np.frombuffer(buf, np.uint8))     # labels: own copy
    for other in (bytes(buf), memoryview(buf)):
        copied, _, _ = decode_batch(headers, other, owned=True)
        assert not np.shares_memory(copied, np.frombuffer(buf, np.uint8))
    headers16, body16 = encode_batch(x, dtype="float16")
    rows16, _, _ = decode_batch(headers16, bytearray(body16), owned=True)
    assert rows16.dtype == np.float32
    np.testing.assert_array_equal(rows16, x.astype(np.float16).astype(np.float32))


def test_float16_round_trip_matches_numpy_half_rounding() -> None:
    x = _rows(16, 3)
    headers, body = encode_batch(x, dtype="float16")
    assert len(body) == 16 * 3 * 2
    rows, lab, step = decode_batch(headers, body)
    expected = np.array([struct.unpack("<e", struct.pack("<e", v))[0] for v in x.ravel()],
                        dtype=np.float32).reshape(16, 3)           # struct's IEEE half, independent
    np.testing.assert_array_equal(rows, expected)
    assert lab is None and step is None


def test_bfloat16_matches_torch_round_to_nearest_even() -> None:
    x = np.concatenate([_rows(64, 8).ravel(),
                        np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5, 0.0, -0.0, np.inf,
                                  -np.inf, 3.4e38, 1e-40], dtype=np.float32)])
    bits = float32_to_bfloat16(x)
    ref = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, ref)
    # ties go to even: 1 + 2^-8 → 1.0 (0x3F80); 1 + 3·2^-8 → 1 + 2^-6 (0x3F82)
    assert bits[-10] == 0x3F80 and bits[-9] == 0x3F80 and bits[-8] == 0x3F82
    nan = float32_to_bfloat16(np.array([np.nan, -np.nan], dtype=np.float32))
    assert np.isnan(bfloat16_to_float32(nan)).all()
    headers, body = encode_batch(x.reshape(-1, 1)[:512].reshape(64, 8), dtype="bfloat16")
    rows, _, _ = decode_batch(headers, body)
    np.testing.assert_array_equal(
        rows, torch.from_numpy(x[:512].copy()).to(torch.bfloat16).float().numpy().reshape(64, 8))


def test_decoding_is_case_insensitive_and_ignores_content_type_parameters() -> None:
    x = _rows(2, 2)
    headers, body = encode_batch(x, step=3)
    lower = {k.lower(): v for k, v in headers.items()}
    lower["content-type"] = "Application/Octet-Stream; charset=binary"
    rows, _, step = decode_batch(lower, body)
    np.testing.assert_array_equal(rows, x)
    assert step == 3


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<f2"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_npy_bodies_any_byte_order_and_memory_order(dtype: str, order: str) -> None:
    x = _rows(6, 4).astype(dtype)
    x = np.asfortranarray(x) if order == "F" else x
    rows, labels, step = decode_batch({"Content-Type": NPY, "X-Repwatch-Step": "9"}, _npy(x))
    np.testing.assert_array_equal(rows, x.astype(np.float64).astype(np.float32))
    assert rows.dtype == np.float32 and rows.flags.c_contiguous and labels is None and step == 9


def test_npy_version_2_header() -> None:
    x = _rows(3, 2)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, x, version=(2, 0))
    rows, _, _ = decode_batch({"Content-Type": NPY}, buf.getvalue())
    np.testing.assert_array_equal(rows, x)


# ---------------------------------------------------------------------- bad input

_CALLS: list[str] = []


def _record(what: str) -> None:
    _CALLS.append(what)


class _Boom:
    """Unpickling this calls :func:`_record`: proof of whether a body was unpickled."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_record, ("unpickled!",))


def test_npy_object_arrays_are_refused_and_never_unpickled() -> None:
    _CALLS.clear()
    arr = np.empty((2, 2), dtype=object)
    arr[0, 0] = _Boom()
    body = _npy(arr, allow_pickle=True)
    assert b"unpickled!" in body                                 # the payload is really there
    status, message = _status({"Content-Type": NPY}, body)
    assert status == 415 and "object" in message and _CALLS == []
    np.load(io.BytesIO(body), allow_pickle=True)                 # the gadget fires when unpickled
    assert _CALLS == ["unpickled!"]


@pytest.mark.parametrize("arr,status,needle", [
    (np.zeros((3, 2), np.float64), 415, "float16 or float32, got dtype '<f8'"),
    (np.zeros((3, 2), np.int32), 415, "got dtype '<i4'"),
    (np.zeros(4, np.float32), 400, "must be 2-D (rows, dim), got shape (4,)"),
    (np.zeros((2, 2, 2), np.float32), 400, "must be 2-D"),
    (np.zeros((0, 3), np.float32), 400, "at least one row"),
])
def test_npy_bad_arrays(arr: np.ndarray, status: int, needle: str) -> None:
    got_status, message = _status({"Content-Type": NPY}, _npy(arr))
    assert got_status == status and needle in message


def test_npy_malformed_bodies() -> None:
    good = _npy(_rows(3, 2))
    assert _status({"Content-Type": NPY}, b"not numpy at all")[0] == 400
    status, message = _status({"Content-Type": NPY}, good[:-4])
    assert status == 400 and "24 bytes" in message and "got 20" in message
    assert _status({"Content-Type": NPY}, good + b"xx")[0] == 400
    broken = good.replace(b"'descr'", b"'dexcr'")
    assert _status({"Content-Type": NPY}, broken)[0] == 400
    v3 = b"\x93NUMPY\x03\x00" + good[8:]
    status, message = _status({"Content-Type": NPY}, v3)
    assert status == 400 and "got 3.0" in message
    status, message = _status({"Content-Type": NPY, "X-Repwatch-Labels": "int64"}, good)
    assert status == 400 and "not supported" in message
    status, message = _status({"Content-Type": NPY}, _npy(_rows(3, 2)), max_rows=2)
    assert status == 400 and "at most 2 rows per batch, got 3" in message


@pytest.mark.parametrize("headers,status,needle", [
    ({"Content-Type": "text/plain"}, 415, "got 'text/plain'"),
    ({}, 415, "got ''"),
    ({"Content-Type": RAW, "X-Repwatch-Shape": "7,5"}, 400, "X-Repwatch-Dtype is required"),
    (_raw_headers(dtype="float64"), 415, "got 'float64'"),
    (_raw_headers(dtype="int8"), 415, "one of float32, float16, bfloat16"),
    ({"Content-Type": RAW, "X-Repwatch-Dtype": "float32"}, 400, "X-Repwatch-Shape is required"),
    (_raw_headers(shape="7x5"), 400, "got '7x5'"),
    (_raw_headers(shape="7,5,1"), 400, "two integers"),
    (_raw_headers(shape="-7,5"), 400, "two integers"),
    (_raw_headers(shape="0,5"), 400, "got shape (0, 5)"),
    (_raw_headers(shape="7,0"), 400, "at least one row and one dimension"),
    (_raw_headers(shape="99999999999,5"), 400, "two integers"),
    (_raw_headers(**{"X-Repwatch-Labels": "int32"}), 400, "must be 'int64'"),
    (_raw_headers(**{"X-Repwatch-Step": "-1"}), 400, "non-negative integer"),
    (_raw_headers(**{"X-Repwatch-Step": "1.5"}), 400, "got '1.5'"),
    (_raw_headers(**{"X-Repwatch-Step": str(2**63)}), 400, "below 2**63"),
])
def test_raw_header_errors(headers: dict[str, str], status: int, needle: str) -> None:
    got_status, message = _status(headers, bytes(7 * 5 * 4))
    assert got_status == status and needle in message, message


def test_raw_body_length_must_match_shape_exactly() -> None:
    status, message = _status(_raw_headers(), bytes(139))
    assert status == 400 and "body must be 140 bytes (7×5 float32 rows), got 139" in message
    status, message = _status(_raw_headers(**{"X-Repwatch-Labels": "int64"}), bytes(140))
    assert status == 400 and "196 bytes (7×5 float32 rows + 7 int64 labels), got 140" in message
    assert _status(_raw_headers(dtype="float16"), bytes(140))[0] == 400


def test_limits_on_rows_and_dimension() -> None:
    headers, body = encode_batch(_rows(7, 5))
    assert "at most 6 rows per batch, got 7" in _status(headers, body, max_rows=6)[1]
    assert "at most 4 dimensions per row, got 5" in _status(headers, body, max_dim=4)[1]
    decode_batch(headers, body, max_rows=7, max_dim=5)          # at the limit: fine


def test_nonfinite_values_pass_through_for_the_monitor_to_count() -> None:
    x = _rows(3, 2)
    x[1, 0] = np.nan
    x[2, 1] = np.inf
    rows, _, _ = decode_batch(*encode_batch(x))
    assert np.isnan(rows[1, 0]) and np.isinf(rows[2, 1])


def test_encode_batch_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        encode_batch(_rows(), dtype="float64")
    with pytest.raises(ValueError, match=r"2-D \(rows, dim\), got shape \(3,\)"):
        encode_batch(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="numeric array"):
        encode_batch(np.array([["a"]]))
    with pytest.raises(ValueError, match=r"expected shape \(7,\), got \(6,\)"):
        encode_batch(_rows(), labels=np.zeros(6, np.int64))
    with pytest.raises(TypeError, match="integer class ids"):
        encode_batch(_rows(), labels=np.zeros(7, np.float32))
    for bad in (-1, True, 1.0, 2**63):
        with pytest.raises(ValueError, match="step must be an int"):
            encode_batch(_rows(), step=bad)  # type: ignore[arg-type]


def test_encode_takes_cpu_tensors_and_integer_rows() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    rows, _, _ = decode_batch(*encode_batch(t, labels=torch.tensor([0, 1, 2])))
    np.testing.assert_array_equal(rows, t.numpy())
    rows, _, _ = decode_batch(*encode_batch(np.arange(6).reshape(2, 3)))
    assert rows.dtype == np.float32 and rows[1, 2] == 5.0

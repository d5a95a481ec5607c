"""The wire format of sidecar mode: one batch of embedding rows per ``POST``, no pickle, no eval.

Two body forms (``POST /v1/runs/{run}/streams/{stream}/batches``):

1. ``Content-Type: application/octet-stream``: raw little-endian rows in C order, then (with
   ``X-Repwatch-Labels: int64``) ``rows`` little-endian int64 class ids. Headers
   ``X-Repwatch-Dtype: float32|float16|bfloat16`` and ``X-Repwatch-Shape: <rows>,<dim>`` are
   required.
2. ``Content-Type: application/x-npy``: a ``.npy`` file of a 2-D float16/float32 array. Only the
   header is parsed by :mod:`numpy.lib.format` (a literal, never pickled); the data is read with
   ``np.frombuffer``. Object dtypes and pickled arrays are refused (415); labels are not
   supported in this form.

``X-Repwatch-Step: <int>`` (optional, both forms) is the training step of the batch.

Pure numpy (no torch): the trainer's :class:`~monitor.transport.sender.Sender` encodes with
:func:`encode_batch`; the service and the shared-memory reader decode with :func:`decode_batch`.
Errors are :class:`ProtocolError` carrying the HTTP status (400 malformed, 413 too large, 415
unsupported) and a message naming what was expected and what was got.
"""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

CONTENT_TYPE_RAW = "application/octet-stream"
CONTENT_TYPE_NPY = "application/x-npy"
CONTENT_TYPES: tuple[str, ...] = (CONTENT_TYPE_RAW, CONTENT_TYPE_NPY)
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
"""Row dtypes of the raw form, as written in ``X-Repwatch-Dtype``."""

H_DTYPE = "X-Repwatch-Dtype"
H_SHAPE = "X-Repwatch-Shape"
H_LABELS = "X-Repwatch-Labels"
H_STEP = "X-Repwatch-Step"

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_SHAPE = re.compile(r"^\s*([0-9]{1,10})\s*,\s*([0-9]{1,10})\s*$")
_STEP = re.compile(r"^\s*\+?([0-9]{1,19})\s*$")
_MAX_STEP = 2**63 - 1
_MAX_NPY_HEADER = 10_000


class ProtocolError(ValueError):
    """A batch that cannot be accepted; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class LowerHeaders(dict[str, str]):
    """Headers with lower-cased names, looked up case-insensitively (:func:`lowered`)."""

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.lower() if isinstance(key, str) else key)


def lowered(headers: Mapping[str, str]) -> LowerHeaders:
    """``headers`` with lower-cased names; given a :class:`LowerHeaders`, that same object (so a
    request's headers are lowered once, not by every parser)."""
    if isinstance(headers, LowerHeaders):
        return headers
    return LowerHeaders((str(k).lower(), str(v)) for k, v in headers.items())



def media_type(headers: Mapping[str, str]) -> str:
    """The media type of ``Content-Type`` (parameters dropped, lower case; '' when absent)."""
    return lowered(headers).get("content-type", "").split(";", 1)[0].strip().lower()


def parse_step(value: str | None) -> int | None:
    """``X-Repwatch-Step``: a non-negative integer below 2**63, or None when absent."""
    if value is None:
        return None
    m = _STEP.match(value)
    if not m or int(m.group(1)) > _MAX_STEP:
        raise ProtocolError(400, f"{H_STEP} must be a non-negative integer below 2**63, "
                                 f"got {value[:40]!r}")
    return int(m.group(1))


def parse_raw_headers(headers: Mapping[str, str], *, max_rows: int | None = None,
                      max_dim: int | None = None) -> tuple[str, int, int, bool]:
    """Validate the raw form's headers before the body is read.

    Returns ``(dtype, rows, dim, has_labels)``. 415 for an unknown dtype; 400 for a missing or
    malformed header or a shape over ``max_rows`` / ``max_dim``.
    """
    h = lowered(headers)
    dtype = h.get(H_DTYPE.lower())
    if dtype is None:
        raise ProtocolError(400, f"header {H_DTYPE} is required with {CONTENT_TYPE_RAW}: "
                                 f"one of {', '.join(DTYPES)}")
    dtype = dtype.strip().lower()
    if dtype not in DTYPES:
        raise ProtocolError(415, f"{H_DTYPE} must be one of {', '.join(DTYPES)}, "
                                 f"got {dtype[:40]!r}")
    shape = h.get(H_SHAPE.lower())
    if shape is None:
        raise ProtocolError(400, f"header {H_SHAPE} is required with {CONTENT_TYPE_RAW}: "
                                 "'<rows>,<dim>'")
    m = _SHAPE.match(shape)
    if not m:
        raise ProtocolError(400, f"{H_SHAPE} must be '<rows>,<dim>' (two integers), "
                                 f"got {shape[:40]!r}")
    rows, dim = int(m.group(1)), int(m.group(2))
    check_shape(rows, dim, max_rows=max_rows, max_dim=max_dim)
    labels = h.get(H_LABELS.lower())
    if labels is not None and labels.strip().lower() != "int64":
        raise ProtocolError(400, f"{H_LABELS} must be 'int64' (or absent), got {labels[:40]!r}")
    return dtype, rows, dim, labels is not None


def check_shape(rows: int, dim: int, *, max_rows: int | None = None,
                max_dim: int | None = None) -> None:
    """400 unless ``1 <= rows <= max_rows`` and ``1 <= dim <= max_dim``."""
    if rows < 1 or dim < 1:
        raise ProtocolError(400, f"a batch needs at least one row and one dimension, "
                                 f"got shape ({rows}, {dim})")
    if max_rows is not None and rows > max_rows:
        raise ProtocolError(400, f"at most {max_rows} rows per batch, got {rows} "
                                 "(subsample on the trainer side)")
    if max_dim is not None and dim > max_dim:
        raise ProtocolError(400, f"at most {max_dim} dimensions per row, got {dim}")


def raw_body_size(dtype: str, rows: int, dim: int, has_labels: bool) -> int:
    """Exact body length in bytes of the raw form."""
    return rows * dim * _ITEMSIZE[dtype] + (8 * rows if has_labels else 0)


def decode_batch(headers: Mapping[str, str], body: bytes | bytearray | memoryview, *,
                 max_rows: int | None = None, max_dim: int | None = None,
                 owned: bool = False) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    """Parse one batch: ``(rows float32 (b, d), labels int64 (b,) or None, step or None)``.

    ``headers`` is any mapping (names are matched case-insensitively). The result never
    references ``body`` (the rows are a fresh, aligned, writable copy), unless ``owned``: the
    caller hands over a ``bytearray`` that nothing else will write, and raw float32 rows are
    then a view on it (no copy; the HTTP ingest reads each body into its own buffer). Raises
    :class:`ProtocolError` (400/415) naming what was expected and what was got.
    """
    step = parse_step(lowered(headers).get(H_STEP.lower()))
    kind = media_type(headers)
    if kind == CONTENT_TYPE_RAW:
        rows, labels = _decode_raw(headers, body, max_rows, max_dim,
                                   owned and isinstance(body, bytearray))
    elif kind == CONTENT_TYPE_NPY:
        if H_LABELS.lower() in lowered(headers):
            raise ProtocolError(400, f"{H_LABELS} is not supported with {CONTENT_TYPE_NPY}; "
                                     f"send labels with {CONTENT_TYPE_RAW}")
        rows, labels = _decode_npy(body, max_rows, max_dim), None
    else:
        raise ProtocolError(415, f"Content-Type must be {CONTENT_TYPE_RAW} or {CONTENT_TYPE_NPY}, "
                                 f"got {kind[:60]!r}")
    return rows, labels, step


def _decode_raw(headers: Mapping[str, str], body: bytes | bytearray | memoryview,
                max_rows: int | None, max_dim: int | None,
                owned: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    dtype, b, d, has_labels = parse_raw_headers(headers, max_rows=max_rows, max_dim=max_dim)
    expected = raw_body_size(dtype, b, d, has_labels)
    if len(body) != expected:
        what = f"{b}×{d} {dtype} rows" + (f" + {b} int64 labels" if has_labels else "")
        raise ProtocolError(400, f"body must be {expected} bytes ({what}), got {len(body)}")
    n = b * d
    buf = memoryview(body)
    if dtype == "float32" and owned and sys.byteorder == "little":
        rows = np.frombuffer(body, dtype=np.float32, count=n)     # a view: malloc-aligned
    elif dtype == "float32":
        rows = np.frombuffer(buf, dtype="<f4", count=n).astype(np.float32)  # own, aligned copy
    elif dtype == "float16":
        rows = np.frombuffer(buf, dtype="<f2", count=n).astype(np.float32)
    else:
        rows = bfloat16_to_float32(np.frombuffer(buf, dtype="<u2", count=n))
    labels = None
    if has_labels:
        offset = n * _ITEMSIZE[dtype]
        labels = np.frombuffer(buf, dtype="<i8", count=b, offset=offset).astype(np.int64)
    return rows.reshape(b, d), labels


def _decode_npy(body: bytes | bytearray, max_rows: int | None,
                max_dim: int | None) -> np.ndarray:
    fp = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(fp)
    except ValueError as exc:
        raise ProtocolError(400, f"body is not a .npy file (expected the \\x93NUMPY magic): "
                                 f"{exc}") from None
    try:
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(
                fp, max_header_size=_MAX_NPY_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(
                fp, max_header_size=_MAX_NPY_HEADER)
        else:
            raise ProtocolError(400, f".npy format version 1.0 or 2.0 expected, got "
                                     f"{version[0]}.{version[1]}")
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, SyntaxError, ...
        raise ProtocolError(400, f"malformed .npy header: {exc}") from None
    if dtype.hasobject or dtype.kind not in "f" or dtype.itemsize not in (2, 4):
        raise ProtocolError(415, f".npy arrays must be float16 or float32, got dtype {dtype.str!r}"
                                 + (" (object arrays are never unpickled)" if dtype.hasobject
                                    else ""))
    if len(shape) != 2:
        raise ProtocolError(400, f".npy array must be 2-D (rows, dim), got shape {shape}")
    b, d = int(shape[0]), int(shape[1])
    check_shape(b, d, max_rows=max_rows, max_dim=max_dim)
    data = memoryview(body)[fp.tell():]
    expected = b * d * dtype.itemsize
    if len(data) != expected:
        raise ProtocolError(400, f".npy data must be {expected} bytes for shape ({b}, {d}) "
                                 f"{dtype.str}, got {len(data)}")
    flat = np.frombuffer(data, dtype=dtype, count=b * d)
    return np.array(flat.reshape((b, d), order="F" if fortran else "C"), dtype=np.float32,
                    order="C")                                       # one fresh copy


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) → float32 (exact: bfloat16 is float32's top half)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def float32_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = np.isnan(x)
    out = rounded.astype(np.uint16)
    out[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)  # quiet NaN
    return out


def encode_batch(rows: Any, labels: Any = None, step: int | None = None,
                 dtype: str = "float32") -> tuple[dict[str, str], bytes]:
    """Encode a batch in the raw form: ``(headers, body)`` ready for ``POST``.

    ``rows``: a 2-D float array (anything :func:`numpy.asarray` takes; a CPU tensor works);
    ``labels``: optional 1-D integer class ids, one per row; ``step``: the training step;
    ``dtype``: wire dtype of the rows (``float32``, ``float16`` or ``bfloat16``).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    arr = np.asarray(rows)
    if arr.dtype.hasobject or arr.dtype.kind not in "fiu":
        raise TypeError(f"rows must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"rows must be 2-D (rows, dim), got shape {arr.shape}")
    b, d = arr.shape
    check_shape(b, d)
    headers = {"Content-Type": CONTENT_TYPE_RAW, H_DTYPE: dtype, H_SHAPE: f"{b},{d}"}
    if dtype == "float32":
        data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
    elif dtype == "float16":
        data = np.ascontiguousarray(arr, dtype="<f2").tobytes()
    else:
        data = float32_to_bfloat16(np.asarray(arr, dtype=np.float32)).astype("<u2").tobytes()
    if labels is not None:
        lab = np.asarray(labels)
        if lab.dtype.kind not in "iu":
            raise TypeError(f"labels must be integer class ids, got dtype {lab.dtype}")
        if lab.shape != (b,):
            raise ValueError(f"labels must hold one class id per row: expected shape ({b},), "
                             f"got {lab.shape}")
        headers[H_LABELS] = "int64"
        data += np.ascontiguousarray(lab, dtype="<i8").tobytes()
    if step is not None:
        if (isinstance(step, bool) or not isinstance(step, (int, np.integer))
                or not 0 <= step <= _MAX_STEP):
            raise ValueError(f"step must be an int in [0, 2**63), got {step!r}")
        headers[H_STEP] = str(int(step))
    return headers, data

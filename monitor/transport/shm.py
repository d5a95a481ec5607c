"""Shared-memory ring transport of sidecar mode: ``sink="shm://NAME"`` / ``repwatch serve --shm NAME``.

For a trainer and a sidecar on the same host (or in the same pod, sharing ``/dev/shm``), batches
go through one POSIX shared-memory segment instead of HTTP: no socket, no HTTP parsing, one copy
in and one copy out. The HTTP path stays the portable one. Pure Python + numpy (no torch): the
sidecar image imports this module.

Layout (native byte order; both ends run on one host)::

    [0, 256)      ring header
      0   magic  b"REPWSHM1"          8   version u32, header size u32
      16  slots u64                   24  slot size u64 (bytes, multiple of 64)
      32  ring id u64 (random per creation)     40  creator pid u64
      48  closed u64 (consumer: 1 = going away)  56  heartbeat u64 (consumer, time.time_ns())
      64  write counter u64 (producer, own cache line)
      128 read counter u64 (consumer, own cache line)
    [256 + i * slot_size, ...)  slot i = counter % slots
      0   seq u64 (the write counter value of the batch)   8  payload length u64
      16  rows u32   20 dim u32   24 step i64 (-1: none)
      32  dtype u8 (0 float32, 1 float16, 2 bfloat16), labels u8, run length u8, stream length u8
      64  run name (ASCII, <= 128 bytes), 192 stream name (<= 128 bytes)
      320 payload: the raw body of :func:`monitor.transport.wire.encode_batch` (little-endian
          rows, then int64 labels); read back with :func:`~monitor.transport.wire.decode_batch`,
          so both transports share one wire format. The slot header is the binary form of the
          ``X-Repwatch-*`` headers.

Single producer (the trainer's sink thread), single consumer (the sidecar's reader thread); one
trainer process per ring (use one NAME per rank). The producer enforces it with an exclusive
``flock`` on the segment (:meth:`ShmRing.claim_producer`): a second trainer attaching to a ring
in use gets :class:`RingError` (its sink counts ``sidecar_down`` and says why), and the lock goes
with the process that held it, so a killed trainer never blocks the next one. The producer fills slot ``w % slots`` and only
then stores ``w + 1`` into the write counter; the consumer copies the slot out (``decode_batch``
makes its own copy) and only then stores ``r + 1`` into the read counter. The counters are
aligned 8-byte words written with single aligned stores (numpy ``uint64`` element assignment).
Python's GIL is no memory barrier across processes: on x86-64 (TSO: stores are not reordered
with older stores, loads not with older loads) this publication order is guaranteed by the
hardware; on ARM64 it is not formally guaranteed without a fence, and we rely on the many
instructions the interpreter runs between the payload copy and the counter store. That is
acceptable for a monitor: the slot's ``seq`` and every length are re-checked on read and a
slot that does not parse is counted and skipped, never trusted.

Full ring: the producer drops the batch (``queue_full``); a batch larger than a slot is dropped
as ``rejected``. The consumer creates the segment (``repwatch serve --shm NAME``), updates the
heartbeat while it runs, sets ``closed`` and unlinks it on exit. A segment whose heartbeat is
older than ``stale_after`` seconds (a sidecar killed with SIGKILL) counts as absent for the
producer and is replaced by the next sidecar that starts with that name.

Cleanup and ``resource_tracker``: the creator uses ``SharedMemory(create=True)`` (registered with
the tracker, balanced by ``unlink()``); attaching never registers (``track=False`` on Python
>= 3.13; on older Pythons ``shm_open`` + ``mmap`` directly, because ``SharedMemory(name)``
registers on attach and unregistering afterwards would also drop the creator's registration
when both ends live in one process).
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
import secrets
import struct
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any, Self
from urllib.parse import parse_qs

import numpy as np

from monitor.transport import wire
from monitor.transport.base import Drop
from monitor.transport.errors import REJECT_REASONS, Rejected
from monitor.validation import is_name

log = logging.getLogger("repwatch")

MAGIC = b"REPWSHM1"
VERSION = 1
HEADER_SIZE = 256
SLOT_HEADER = 320
DEFAULT_SLOTS = 64
DEFAULT_SLOT_MB = 4.0
MAX_SLOTS = 1 << 16
MAX_RING_BYTES = 16 << 30
_MIB = 1 << 20

# header words (uint64 index into the header)
_W_SLOTS, _W_SLOT_SIZE, _W_ID, _W_PID, _W_CLOSED, _W_BEAT, _W_WRITE, _W_READ = 2, 3, 4, 5, 6, 7, 8, 16

_SLOT = struct.Struct("<QQIIqBBBB")          # seq, length, rows, dim, step, dtype, labels, |run|, |stream|
_DTYPES = ("float32", "float16", "bfloat16")
_RING_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$")


class RingError(RuntimeError):
    """The segment is absent, stale, closed, or not a repwatch ring (the producer retries)."""


@dataclass(frozen=True)
class RingSpec:
    """A parsed ``shm://NAME?slots=N&slot_mb=M``; ``slots``/``slot_mb`` are None when not given."""

    name: str
    slots: int | None = None
    slot_mb: float | None = None

    @property
    def slot_size(self) -> int:
        """Bytes per slot: ``slot_mb`` MiB of payload (the largest batch body) plus the slot
        header, rounded up to 64."""
        mb = DEFAULT_SLOT_MB if self.slot_mb is None else self.slot_mb
        return -(-(int(mb * _MIB) + SLOT_HEADER) // 64) * 64


def parse_spec(spec: str) -> RingSpec:
    """Parse ``shm://NAME[?slots=N&slot_mb=M]`` (the ``shm://`` prefix is optional).

    NAME: 1–100 characters of letters, digits, ``_.-`` (not starting with ``.``); slots in
    [1, 65536]; slot_mb > 0 with a slot of at least 4 KiB; the ring at most 16 GiB.
    """
    if not isinstance(spec, str):
        raise TypeError(f"shm ring must be a string like 'shm://NAME?slots=64&slot_mb=4', "
                         f"got {type(spec).__name__}")
    text = spec.removeprefix("shm://")
    name, _, query = text.partition("?")
    if not _RING_NAME.match(name):
        raise ValueError(f"shm ring name must be 1–100 characters of letters, digits and _.- "
                         f"(not starting with '.'), got {name!r}")
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"shm ring options must be 'slots=N&slot_mb=M', got {query!r}") from None
    unknown = sorted(set(params) - {"slots", "slot_mb"})
    if unknown:
        raise ValueError(f"shm ring options are slots and slot_mb, got {unknown}")
    if any(len(v) != 1 for v in params.values()):
        raise ValueError(f"each shm ring option may be given once, got {query!r}")
    slots = slot_mb = None
    if "slots" in params:
        raw = params["slots"][0]
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_SLOTS:
            raise ValueError(f"slots must be an integer in [1, {MAX_SLOTS}], got {raw!r}")
        slots = int(raw)
    if "slot_mb" in params:
        raw = params["slot_mb"][0]
        try:
            slot_mb = float(raw)
        except ValueError:
            slot_mb = -1.0
        if not (slot_mb * _MIB >= 4096 and slot_mb < 4096):
            raise ValueError(f"slot_mb must be a number of MiB in [1/256, 4096), got {raw!r}")
    out = RingSpec(name, slots, slot_mb)
    total = HEADER_SIZE + (slots or DEFAULT_SLOTS) * out.slot_size
    if total > MAX_RING_BYTES:
        raise ValueError(f"the ring would take {total} bytes (slots × slot_mb); at most "
                         f"{MAX_RING_BYTES} bytes")
    return out


def _attach_untracked(name: str) -> tuple[Any, memoryview]:
    """Map an existing segment without registering it with ``resource_tracker``."""
    if sys.version_info >= (3, 13):
        seg = shared_memory.SharedMemory(name, track=False)  # type: ignore[call-arg]
        return seg, seg.buf
    import _posixshmem  # the module SharedMemory itself uses on POSIX

    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    try:
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            raise RingError(f"shm segment {name!r} has {size} bytes; not a repwatch ring (yet)")
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    return mm, memoryview(mm)


def unlink_segment(name: str) -> bool:
    """Remove segment ``name`` without touching ``resource_tracker``; False when absent."""
    try:
        if sys.version_info >= (3, 13):
            shared_memory.SharedMemory(name, track=False).unlink()  # type: ignore[call-arg]
        else:
            import _posixshmem

            _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        return False
    return True


class ShmRing:
    """One end of a ring: :meth:`create` (consumer side) or :meth:`attach` (producer side)."""

    def __init__(self, name: str, segment: Any, buf: memoryview, *, owner: bool) -> None:
        self.name = name
        self.owner = owner
        self._segment = segment
        self._buf: memoryview | None = buf
        self._words: np.ndarray | None = np.ndarray((HEADER_SIZE // 8,), dtype=np.uint64,
                                                    buffer=buf, offset=0)
        self.slots = int(self._words[_W_SLOTS])
        self.slot_size = int(self._words[_W_SLOT_SIZE])
        self.ring_id = int(self._words[_W_ID])
        self._w = int(self._words[_W_WRITE])     # producer's own copy of the write counter
        self._r = int(self._words[_W_READ])      # consumer's own copy of the read counter
        self._producer_fd: int | None = None

    # ------------------------------------------------------------------ open / close

    @classmethod
    def create(cls, name: str, slots: int = DEFAULT_SLOTS,
               slot_size: int = int(DEFAULT_SLOT_MB * _MIB) + SLOT_HEADER,
               *, stale_after: float = 5.0) -> ShmRing:
        """Create segment ``name`` (replacing a stale or closed one); FileExistsError when a
        live consumer (heartbeat younger than ``stale_after`` s) already serves it."""
        spec = parse_spec(name)
        if spec.slots is not None or spec.slot_mb is not None:
            raise ValueError(f"pass slots/slot_size as arguments, not in the name: {name!r}")
        if not 1 <= slots <= MAX_SLOTS or slot_size < SLOT_HEADER + 64 or slot_size % 64:
            raise ValueError(f"slots must be in [1, {MAX_SLOTS}] and slot_size a multiple of 64 "
                             f">= {SLOT_HEADER + 64}, got slots={slots}, slot_size={slot_size}")
        size = HEADER_SIZE + slots * slot_size
        try:
            seg = shared_memory.SharedMemory(name, create=True, size=size)
        except FileExistsError:
            cls._check_replaceable(name, stale_after)
            unlink_segment(name)
            log.warning("repwatch shm: replaced stale ring %r (its sidecar is gone)", name)
            seg = shared_memory.SharedMemory(name, create=True, size=size)
        words = np.ndarray((HEADER_SIZE // 8,), dtype=np.uint64, buffer=seg.buf, offset=0)
        words[1:] = 0
        struct.pack_into("<II", seg.buf, 8, VERSION, HEADER_SIZE)
        words[_W_SLOTS], words[_W_SLOT_SIZE] = slots, slot_size
        words[_W_ID] = secrets.randbits(63)
        words[_W_PID] = os.getpid()
        words[_W_BEAT] = time.time_ns()
        seg.buf[0:8] = MAGIC                      # last: the header is complete
        del words
        return cls(name, seg, seg.buf, owner=True)

    @staticmethod
    def _check_replaceable(name: str, stale_after: float) -> None:
        try:
            other = ShmRing.attach(name, stale_after=stale_after)
        except RingError:
            return                                # stale, closed or garbage: replace it
        except FileNotFoundError:
            return
        other.close()
        raise FileExistsError(f"shm ring {name!r} is already served by a live sidecar "
                              f"(heartbeat younger than {stale_after} s)")

    @classmethod
    def attach(cls, name: str, *, stale_after: float = 5.0) -> ShmRing:
        """Map an existing ring. FileNotFoundError when absent; :class:`RingError` when it is
        not a repwatch ring of this version, closed, or its heartbeat is stale."""
        segment, buf = _attach_untracked(name)
        try:
            if len(buf) < HEADER_SIZE or bytes(buf[0:8]) != MAGIC:
                raise RingError(f"shm segment {name!r} is not a repwatch ring (magic "
                                f"{bytes(buf[0:8])!r})")
            version, _ = struct.unpack_from("<II", buf, 8)
            if version != VERSION:
                raise RingError(f"shm ring {name!r} has version {version}; this repwatch "
                                f"speaks version {VERSION}")
            ring = cls(name, segment, buf, owner=False)
        except BaseException:
            _close_segment(segment, buf)
            raise
        try:
            if HEADER_SIZE + ring.slots * ring.slot_size > len(buf) or ring.slot_size <= SLOT_HEADER:
                raise RingError(f"shm ring {name!r} header says {ring.slots} slots of "
                                f"{ring.slot_size} bytes but the segment has {len(buf)} bytes")
            why = ring.down(stale_after)
            if why:
                raise RingError(f"shm ring {name!r} {why}")
        except BaseException:
            ring.close()
            raise
        return ring

    def claim_producer(self) -> None:
        """Become the ring's only producer: an exclusive, non-blocking ``flock`` on the segment,
        held until :meth:`close` (or the process's end). :class:`RingError` when another
        producer (another trainer process, or another sink of this one) holds it."""
        if self._producer_fd is not None:
            return
        import fcntl

        import _posixshmem

        fd = _posixshmem.shm_open("/" + self.name, os.O_RDWR, mode=0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RingError(f"shm ring {self.name!r} already has a producer: one trainer "
                            "process per ring (use one ring NAME per rank)") from None
        except BaseException:
            os.close(fd)
            raise
        self._producer_fd = fd

    def close(self) -> None:
        """Unmap (idempotent); the owner also marks the ring closed and unlinks it; a producer
        releases its claim."""
        if self._producer_fd is not None:
            fd, self._producer_fd = self._producer_fd, None
            os.close(fd)                          # releases the flock
        if self._buf is None:
            return
        if self.owner and self._words is not None:
            self._words[_W_CLOSED] = 1
        self._words = None
        buf, self._buf = self._buf, None
        _close_segment(self._segment, buf)
        if self.owner:
            try:
                self._segment.unlink()            # also balances the tracker's registration
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ state

    @property
    def closed(self) -> bool:
        return self._buf is None

    @property
    def max_payload(self) -> int:
        """Largest body (bytes) one slot holds."""
        return self.slot_size - SLOT_HEADER

    def counters(self) -> tuple[int, int]:
        """(write, read) counters as stored in the segment."""
        words = self._live()
        return int(words[_W_WRITE]), int(words[_W_READ])

    def pending(self) -> int:
        """Batches written and not yet read."""
        w, r = self.counters()
        return max(0, w - r)

    def down(self, stale_after: float) -> str:
        """'' while the consumer is alive, else why not (closed / heartbeat age)."""
        words = self._live()
        if int(words[_W_CLOSED]):
            return "was closed by its sidecar"
        age = (time.time_ns() - int(words[_W_BEAT])) / 1e9
        if age > stale_after:
            return f"has a stale heartbeat ({age:.1f} s old; its sidecar is gone)"
        return ""

    def beat(self) -> None:
        """Consumer: record that it is alive."""
        self._live()[_W_BEAT] = time.time_ns()

    def _live(self) -> np.ndarray:
        if self._words is None:
            raise RingError(f"shm ring {self.name!r} is closed on this side")
        return self._words

    # ------------------------------------------------------------------ producer

    def full(self) -> bool:
        """True when no slot is free (producer side)."""
        return self._w - int(self._live()[_W_READ]) >= self.slots

    def write(self, run: str, stream: str, headers: Mapping[str, str], body: bytes) -> bool:
        """Publish one encoded batch (``headers, body = encode_batch(...)``); False when full.

        ValueError when ``body`` does not fit a slot or a name is invalid.
        """
        words = self._live()
        buf = self._buf
        assert buf is not None
        if len(body) > self.max_payload:
            raise ValueError(f"a batch of {len(body)} bytes does not fit a slot of "
                             f"{self.max_payload} payload bytes (raise slot_mb)")
        dtype, b, d, has_labels = wire.parse_raw_headers(headers)
        step = wire.parse_step(_get(headers, wire.H_STEP))
        rb, sb = run.encode("ascii"), stream.encode("ascii")
        if not (is_name(run) and is_name(stream)):
            raise ValueError(f"run and stream must be 1–128 characters of letters, digits and "
                             f"_.:/-, got {run!r} / {stream!r}")
        w = self._w
        if w - int(words[_W_READ]) >= self.slots:
            return False
        off = HEADER_SIZE + (w % self.slots) * self.slot_size
        _SLOT.pack_into(buf, off, w, len(body), b, d, -1 if step is None else step,
                        _DTYPES.index(dtype), int(has_labels), len(rb), len(sb))
        buf[off + 64:off + 64 + len(rb)] = rb
        buf[off + 192:off + 192 + len(sb)] = sb
        buf[off + SLOT_HEADER:off + SLOT_HEADER + len(body)] = body
        words[_W_WRITE] = w + 1                   # publish: one aligned 8-byte store, last
        self._w = w + 1
        return True

    # ------------------------------------------------------------------ consumer

    def read(self) -> ShmBatch | None:
        """The oldest unread batch (its payload is a view into the slot, valid until
        :meth:`advance`), or None when empty. RingError when the slot is inconsistent (the
        caller then calls :meth:`advance` to skip it)."""
        words = self._live()
        buf = self._buf
        assert buf is not None
        r = self._r
        if int(words[_W_WRITE]) <= r:
            return None
        off = HEADER_SIZE + (r % self.slots) * self.slot_size
        seq, n, b, d, step, dt, lab, lr, ls = _SLOT.unpack_from(buf, off)
        if seq != r or n > self.max_payload or dt >= len(_DTYPES) or lab > 1 or not (
                1 <= lr <= 128 and 1 <= ls <= 128):
            raise RingError(f"shm ring {self.name!r}: slot of batch {r} is inconsistent "
                            f"(seq {seq}, length {n}, dtype code {dt})")
        try:
            run = bytes(buf[off + 64:off + 64 + lr]).decode("ascii")
            stream = bytes(buf[off + 192:off + 192 + ls]).decode("ascii")
        except UnicodeDecodeError:
            raise RingError(f"shm ring {self.name!r}: batch {r} has non-ASCII names") from None
        headers = {"Content-Type": wire.CONTENT_TYPE_RAW, wire.H_DTYPE: _DTYPES[dt],
                   wire.H_SHAPE: f"{b},{d}"}
        if lab:
            headers[wire.H_LABELS] = "int64"
        if step >= 0:
            headers[wire.H_STEP] = str(step)
        return ShmBatch(run, stream, headers, buf[off + SLOT_HEADER:off + SLOT_HEADER + n])

    def advance(self) -> None:
        """Consumer: release the slot returned by :meth:`read`."""
        self._r += 1
        self._live()[_W_READ] = self._r           # one aligned 8-byte store

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pending={self.pending()}"
        return (f"ShmRing({self.name!r}, slots={self.slots}, slot_size={self.slot_size}, "
                f"{'owner' if self.owner else 'attached'}, {state})")


@dataclass
class ShmBatch:
    """One batch read from a ring: names, the wire headers, and a view of the raw body."""

    run: str
    stream: str
    headers: dict[str, str]
    payload: memoryview


def _get(headers: Mapping[str, str], key: str) -> str | None:
    low = key.lower()
    for k, v in headers.items():
        if k.lower() == low:
            return v
    return None


def _close_segment(segment: Any, buf: memoryview) -> None:
    """Unmap; when another thread still holds a view, leave the unmapping to the GC."""
    try:
        if isinstance(segment, shared_memory.SharedMemory):
            segment.close()
        else:
            buf.release()
            segment.close()
    except BufferError:
        pass


class ShmTransport:
    """The trainer's end: writes encoded batches into ring ``spec`` (``shm://NAME``, optionally
    ``?slots=N&slot_mb=M``: the geometry expected; the sidecar decides it, a mismatch is logged
    once), attaching lazily and claiming the ring as its only producer.

    Outcomes: ``sidecar_down`` when the ring is absent, closed, not a repwatch ring, claimed by
    another producer, or its heartbeat is older than ``stale_after`` seconds (the transport
    then detaches and re-attaches on a later batch); ``queue_full`` when the ring is full
    (checked before the batch is encoded); ``rejected`` for a batch larger than a slot.
    :meth:`drained` is True once the sidecar has read everything out of the ring.
    """

    def __init__(self, spec: str, *, stale_after: float = 5.0) -> None:
        self.spec = parse_spec(spec)
        if not isinstance(stale_after, (int, float)) or not 0 < stale_after < math.inf:
            raise ValueError(f"stale_after must be a positive number of seconds, "
                             f"got {stale_after!r}")
        self.stale_after = float(stale_after)
        self.where = f"shm://{self.spec.name}"
        self._ring: ShmRing | None = None           # the sender thread's only
        self._warned = False

    def _attach(self) -> ShmRing:
        ring = ShmRing.attach(self.spec.name, stale_after=self.stale_after)
        try:
            ring.claim_producer()                   # one trainer per ring
        except BaseException:
            ring.close()
            raise
        want = (self.spec.slots, None if self.spec.slot_mb is None else self.spec.slot_size)
        if not self._warned and (want[0] not in (None, ring.slots)
                                 or want[1] not in (None, ring.slot_size)):
            self._warned = True
            log.warning("repwatch sink: ring %s has %d slots of %d bytes, not the slots=%s "
                        "slot_mb=%s asked for; the sidecar's geometry is used", self.where,
                        ring.slots, ring.slot_size, self.spec.slots, self.spec.slot_mb)
        return ring

    def close(self) -> None:
        ring, self._ring = self._ring, None
        if ring is not None:
            ring.close()

    def ready(self) -> Drop | None:
        ring = self._ring
        why = ""
        if ring is not None:
            why = ring.down(self.stale_after)
            if why:
                self.close()
                ring = None
                why = f"ring {why}"
        else:
            try:
                ring = self._ring = self._attach()
            except FileNotFoundError:
                why = "no shared-memory ring of that name (is `repwatch serve --shm` running?)"
            except PermissionError as exc:
                why = f"{exc} (trainer and sidecar must run as the same user)"
            except (RingError, OSError, ValueError) as exc:
                why = str(exc)
        if ring is None:
            return Drop("sidecar_down", why)
        if ring.full():                             # before encoding a batch that cannot go
            return Drop("queue_full")
        return None

    def send(self, run: str, stream: str, headers: Mapping[str, str], body: bytes,
             deadline: float = math.inf) -> Drop | None:
        ring = self._ring
        if ring is None:
            drop = self.ready()
            if drop is not None:
                return drop
            ring = self._ring
            assert ring is not None
        if len(body) > ring.max_payload:
            return Drop("rejected", f"repwatch sink: a batch of stream {stream!r} needs "
                                    f"{len(body)} bytes, more than a slot of ring {self.where} "
                                    f"holds ({ring.max_payload}); such batches are dropped "
                                    "(subsample more, or serve with a larger slot_mb)", key=413)
        return None if ring.write(run, stream, headers, body) else Drop("queue_full")

    def drained(self) -> bool:
        ring = self._ring
        try:
            return ring is None or ring.closed or ring.pending() == 0 or bool(
                ring.down(self.stale_after))
        except Exception:  # noqa: BLE001 - detached meanwhile
            return True

    def __repr__(self) -> str:
        return f"ShmTransport({self.where!r})"


class ShmReader:
    """The sidecar's end: create ring ``spec`` and feed its batches to ``sidecar.submit``.

    One daemon thread reads the ring, decodes each batch with
    :func:`monitor.transport.wire.decode_batch` (the sidecar's row/dimension limits apply) and
    calls ``sidecar.submit(run, stream, rows, labels, step)``. While the sidecar's scoring queue
    is full (``sidecar.saturated``) the reader waits and leaves batches in the ring, so
    backpressure reaches the trainer, which then drops and counts ``queue_full``. Batches the
    sidecar refuses (cardinality limits, malformed slots) are counted with ``sidecar.reject``
    and logged once per reason; dimension changes and overload are counted by the sidecar
    itself, as for HTTP.
    """

    def __init__(self, spec: str, sidecar: Any, *, stale_after: float = 5.0,
                 idle_sleep: float = 0.005) -> None:
        self.spec = parse_spec(spec)
        self.sidecar = sidecar
        self.stale_after = float(stale_after)
        self.idle_sleep = float(idle_sleep)
        self.read_batches = 0
        self.ring: ShmRing | None = None
        self._stop = threading.Event()
        self._logged: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name="repwatch-shm-reader",
                                        daemon=True)

    def start(self) -> Self:
        """Create the ring (FileExistsError when a live sidecar serves it) and start reading."""
        self.ring = ShmRing.create(self.spec.name, self.spec.slots or DEFAULT_SLOTS,
                                   self.spec.slot_size, stale_after=self.stale_after)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Mark the ring closed, hand what is in it to the sidecar (at most ``timeout`` s),
        stop the thread, unlink the segment. Idempotent."""
        ring = self.ring
        if ring is None or ring.closed:
            return
        ring._live()[_W_CLOSED] = 1               # producers stop writing, then we drain
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and ring.pending() and time.monotonic() < deadline:
            time.sleep(0.005)
        self._stop.set()
        self._thread.join(max(0.1, deadline - time.monotonic()))
        if not self._thread.is_alive():
            ring.close()
        else:  # cannot unmap under a running reader; unlink only (the mapping goes at exit)
            try:
                ring._segment.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        ring = self.ring
        assert ring is not None
        sleep = self.idle_sleep / 16
        last_beat = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_beat > 0.05:
                ring.beat()
                last_beat = now
            if getattr(self.sidecar, "saturated", False):
                time.sleep(self.idle_sleep)       # backpressure: leave batches in the ring
                continue
            try:
                got = self._take(ring)
            except Exception as exc:  # noqa: BLE001 - never let the reader die
                self._log_once("error", f"repwatch shm reader: {type(exc).__name__}: {exc}")
                got = True
            if got:
                sleep = self.idle_sleep / 16
            else:
                time.sleep(sleep)
                sleep = min(sleep * 2, self.idle_sleep)

    def _take(self, ring: ShmRing) -> bool:
        try:
            item = ring.read()
        except RingError as exc:
            ring.advance()
            self._reject("bad_request", str(exc))
            return True
        if item is None:
            return False
        try:
            if not (is_name(item.run) and is_name(item.stream)):
                raise wire.ProtocolError(422, f"bad run/stream names {item.run!r}/{item.stream!r}")
            cfg = self.sidecar.config
            rows, labels, step = wire.decode_batch(item.headers, item.payload,
                                                   max_rows=cfg.max_rows_per_batch,
                                                   max_dim=cfg.max_dim)
        except wire.ProtocolError as exc:
            reason = {415: "unsupported", 422: "invalid"}.get(exc.status, "bad_request")
            self._reject(reason, exc.message)
            return True
        finally:
            item.payload.release()
            ring.advance()
        self.read_batches += 1
        try:
            self.sidecar.submit(item.run, item.stream, rows, labels, step)
        except Rejected as exc:
            if exc.reason in REJECT_REASONS:
                self.sidecar.reject(exc.reason)
            self._log_once(exc.reason, f"repwatch shm reader: batch of {item.run!r}/"
                                       f"{item.stream!r} refused: {exc.message} (further ones "
                                       "are only counted)")
        return True

    def _reject(self, reason: str, message: str) -> None:
        self.sidecar.reject(reason)
        self._log_once(reason, f"repwatch shm reader: dropped a batch ({message}); further "
                               "ones are only counted")

    def _log_once(self, key: str, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning("%s", message)


__all__ = ["DEFAULT_SLOTS", "DEFAULT_SLOT_MB", "RingError", "RingSpec", "ShmBatch", "ShmReader",
           "ShmRing", "ShmTransport", "parse_spec", "unlink_segment"]

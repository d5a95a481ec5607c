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
``flock`` on the segment it mapped (:meth:`ShmRing.claim_producer`): a second trainer attaching
to a ring in use gets :class:`RingError` (its sink counts ``sidecar_down`` and says why), and the
lock goes with the process that held it, so a killed trainer never blocks the next one.

Each end keeps a file descriptor of the segment beside its mapping. Only the header's words are
accessed through the mapping; the slots are written and read with ``pwrite``/``pread`` on the
descriptor (see Faults). The producer writes slot ``w % slots`` (fields, names and payload, then
its ``seq`` last) and only then stores ``w + 1`` into the write counter; the consumer copies the
slot out (into a buffer of its own, which ``decode_batch`` then owns) and only then stores
``r + 1`` into the read counter. The counters are aligned 8-byte words written with single
aligned stores (numpy ``uint64`` element assignment). Python's GIL is no memory barrier across
processes: on x86-64 (TSO: stores are not reordered with older stores, loads not with older
loads) this publication order is guaranteed by the hardware; on ARM64 it is not formally
guaranteed without a fence, and we rely on the system calls and the many instructions the
interpreter runs between the slot's copy and the counter store. That is acceptable for a
monitor: the slot's ``seq`` and every length are re-checked on read and a slot that does not
parse is counted and skipped, never trusted.

Full ring: the producer drops the batch (``queue_full``); a batch larger than a slot is dropped
as ``rejected``. The consumer creates the segment (``repwatch serve --shm NAME``), updates the
heartbeat while it runs, sets ``closed`` and unlinks it on exit. A segment whose heartbeat is
older than ``stale_after`` seconds (a sidecar killed with SIGKILL) counts as absent for the
producer and is replaced by the next sidecar that starts with that name.

Faults. Anything that may write ``/dev/shm`` can damage a ring under running ends. Neither end
may die of it, and no batch may count as sent while nothing delivers it:

* Truncation (``os.truncate``, ``echo x > /dev/shm/NAME``). Touching a page of a mapping past
  the end of its file raises SIGBUS, which kills the process. So every access to the header
  words (:meth:`~ShmRing.write`, :meth:`~ShmRing.read`, :meth:`~ShmRing.advance`,
  :meth:`~ShmRing.beat`, :meth:`~ShmRing.down`, :meth:`~ShmRing.full`,
  :meth:`~ShmRing.counters`, :meth:`~ShmRing.mark_closed`, :meth:`~ShmRing.close`) comes after
  an ``fstat`` of the descriptor showing the size the header gives; the slots are only accessed
  with ``pread``/``pwrite``, which come back short (or extend the file) on a truncated segment
  instead of faulting; a slot written is checked again before it is published. A smaller
  segment (or a short read) is a :class:`RingFault` with ``truncated``: that end stops using
  the ring and never touches the mapping again. Batches that were in the ring (at most
  ``slots``, counted as sent by the trainer) are lost with it.
* Inconsistent counters (a corrupted write or read counter, a rewritten header). The producer
  checks, before each write and in ``full``, that the write counter equals its own copy,
  ``0 <= write - read <= slots`` and the ring id; the consumer, before each read, that the read
  counter equals its own copy, ``0 <= write - read <= slots`` and the ring id, and that the slot
  the write counter announces holds that batch (one slot that does not is counted and skipped;
  two in a row are a counter fault); :meth:`~ShmRing.attach` refuses a ring whose counters
  disagree (:class:`RingError`). A producer that finds the write counter changed stores its own
  value back first (it owns that word: the batches it published stay readable), then stops
  using the ring.

On a fault the producer (:class:`ShmTransport`) counts the batch as ``sidecar_down`` with the
reason, detaches, and attaches again on a later batch (after the sender's backoff), to the ring
the sidecar created anew; training goes on. The consumer (:class:`ShmReader`) counts one
``bad_request`` rejection per fault (and ``ShmReader.faults``), logs the first one, marks the
ring closed (unless truncated), unlinks it and creates a new ring (a new ring id) under the same
name, which producers then attach to. A ring with bad counters still has sound slots: the reader
goes on reading them by their ``seq`` (written last, so a slot holding the next number is
complete; at most ``slots`` batches) until no producer holds its claim on that segment any more
(the producer leaves at its next batch, on the closed flag) or ``stale_after`` seconds passed, so
what was counted as sent is delivered.

What remains: an ``fstat`` check and the access after it are not atomic. A segment truncated to
zero bytes in that instant still raises SIGBUS on the header's page (truncation to one byte or
more keeps the page the header lies in, so only that size can); the window is a few interpreter
instructions long, and the slots are never in it. A truncation during a producer's ``pwrite``
can extend the file again (with zeros): the consumer then finds slots that are not the batches
announced and re-creates the ring as for bad counters. A corrupted read counter can let the
producer overwrite unread batches (at most ``slots``) before the consumer notices.

Cost: each check is one ``fstat`` (about a microsecond); a batch takes the producer four checks
and two writes, the consumer two checks and two reads. Copying through the descriptor is slower
than through the mapping (measured on the 2-core dev machine: some 20 µs more per 128 KiB batch
on each side, about twice the transport's own time), but it releases the GIL while it copies.

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
_SLOT_REST = struct.Struct("<QIIqBBBB")      # the same from byte 8 (seq is written last)
_SEQ = struct.Struct("<Q")
_DTYPES = ("float32", "float16", "bfloat16")
_RING_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$")


class RingError(RuntimeError):
    """The segment is absent, stale, closed, or not a repwatch ring (the producer retries)."""


class RingFault(RingError):
    """The segment was damaged under a running ring: ``truncated`` (its mapping must not be
    touched again), or its counters or slots are inconsistent. The end that finds it stops
    using the ring (see the module's Faults)."""

    def __init__(self, message: str, *, truncated: bool) -> None:
        super().__init__(message)
        self.truncated = truncated


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



def _attach_untracked(name: str) -> tuple[Any, memoryview, int]:
    """Map an existing segment without registering it with ``resource_tracker``; also return a
    file descriptor of it that the caller owns (``fstat``, ``pread``/``pwrite``, ``flock``)."""
    if sys.version_info >= (3, 13):
        seg = shared_memory.SharedMemory(name, track=False)  # type: ignore[call-arg]
        try:
            fd = os.dup(seg._fd)  # type: ignore[attr-defined]  # the mapped segment itself
        except BaseException:
            seg.close()
            raise
        return seg, seg.buf, fd
    import _posixshmem  # the module SharedMemory itself uses on POSIX

    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    try:
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            raise RingError(f"shm segment {name!r} has {size} bytes; not a repwatch ring (yet)")
        mm = mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return mm, memoryview(mm), fd


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
    """One end of a ring: :meth:`create` (consumer side) or :meth:`attach` (producer side).

    ``fault`` says why this end stopped using the ring (None while it is sound); ``truncated``
    whether the segment got smaller than its header says (see the module's Faults).
    """

    def __init__(self, name: str, segment: Any, buf: memoryview, fd: int, *,
                 owner: bool) -> None:
        self.name = name
        self.owner = owner
        self._segment = segment
        self._buf: memoryview | None = buf
        self._fd = fd                             # this end's own descriptor of the segment
        self._words: np.ndarray | None = np.ndarray((HEADER_SIZE // 8,), dtype=np.uint64,
                                                    buffer=buf, offset=0)
        self.slots = int(self._words[_W_SLOTS])
        self.slot_size = int(self._words[_W_SLOT_SIZE])
        self.ring_id = int(self._words[_W_ID])
        self._w = int(self._words[_W_WRITE])     # producer's own copy of the write counter
        self._r = int(self._words[_W_READ])      # consumer's own copy of the read counter
        self._size = HEADER_SIZE + self.slots * self.slot_size   # what the header promises
        self._claimed = False
        self.fault: str | None = None
        self.truncated = False
        self._salvage_from = 0                    # first batch read by seq after a fault
        self._bad_seq = 0                         # slots in a row not holding the batch announced

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
        try:
            fd = os.dup(seg._fd)  # type: ignore[attr-defined]  # the one SharedMemory keeps
        except BaseException:
            seg.close()
            seg.unlink()
            raise
        words = np.ndarray((HEADER_SIZE // 8,), dtype=np.uint64, buffer=seg.buf, offset=0)
        words[1:] = 0
        struct.pack_into("<II", seg.buf, 8, VERSION, HEADER_SIZE)
        words[_W_SLOTS], words[_W_SLOT_SIZE] = slots, slot_size
        words[_W_ID] = secrets.randbits(63)
        words[_W_PID] = os.getpid()
        words[_W_BEAT] = time.time_ns()
        seg.buf[0:8] = MAGIC                      # last: the header is complete
        del words
        return cls(name, seg, seg.buf, fd, owner=True)

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
        not a repwatch ring of this version, closed, its heartbeat is stale, or its counters
        disagree."""
        segment, buf, fd = _attach_untracked(name)
        try:
            if len(buf) < HEADER_SIZE or bytes(buf[0:8]) != MAGIC:
                raise RingError(f"shm segment {name!r} is not a repwatch ring (magic "
                                f"{bytes(buf[0:8])!r})")
            version, _ = struct.unpack_from("<II", buf, 8)
            if version != VERSION:
                raise RingError(f"shm ring {name!r} has version {version}; this repwatch "
                                f"speaks version {VERSION}")
            ring = cls(name, segment, buf, fd, owner=False)
        except BaseException:
            _close_segment(segment, buf)
            os.close(fd)
            raise
        try:
            if HEADER_SIZE + ring.slots * ring.slot_size > len(buf) or ring.slot_size <= SLOT_HEADER:
                raise RingError(f"shm ring {name!r} header says {ring.slots} slots of "
                                f"{ring.slot_size} bytes but the segment has {len(buf)} bytes")
            why = ring.down(stale_after)
            if why:
                raise RingError(f"shm ring {name!r} {why}")
            w, r = ring.counters()
            if not 0 <= w - r <= ring.slots:
                raise RingError(f"shm ring {name!r} has inconsistent counters (write {w}, "
                                f"read {r}, {ring.slots} slots); its sidecar re-creates it")
        except BaseException:
            ring.close()
            raise
        return ring

    def claim_producer(self) -> None:
        """Become the ring's only producer: an exclusive, non-blocking ``flock`` on the mapped
        segment, held until :meth:`close` (or the process's end). :class:`RingError` when
        another producer (another trainer process, or another sink of this one) holds it."""
        if self._claimed:
            return
        import fcntl

        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RingError(f"shm ring {self.name!r} already has a producer: one trainer "
                            "process per ring (use one ring NAME per rank)") from None
        self._claimed = True

    def has_producer(self) -> bool:
        """True while a producer holds its claim (:meth:`claim_producer`) on this segment."""
        import fcntl

        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return False

    def unlink(self) -> None:
        """Owner: remove the segment's name now (the mapping stays until :meth:`close`, which
        then no longer unlinks: the name may serve a new ring by then)."""
        if self.owner:
            self.owner = False
            try:
                self._segment.unlink()            # also balances the tracker's registration
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Unmap (idempotent); the owner also marks the ring closed (unless truncated) and
        unlinks it; a producer releases its claim."""
        if self._buf is None:
            return
        if self.owner:
            try:
                self.mark_closed()
            except RingError:
                pass                              # truncated: the mapping is not touched
        self._words = None
        buf, self._buf = self._buf, None
        _close_segment(self._segment, buf)
        fd, self._fd = self._fd, -1
        if self._claimed:
            self._claimed = False
            import fcntl

            try:
                fcntl.flock(fd, fcntl.LOCK_UN)    # the descriptor may be shared (a dup)
            except OSError:
                pass
        os.close(fd)
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
        """(write, read) counters as stored in the segment (the read counter is loaded first,
        so a third party never sees read > write)."""
        words = self._live(faulted=True)
        r = int(words[_W_READ])
        return int(words[_W_WRITE]), r

    def pending(self) -> int:
        """Batches written and not yet read (in [0, slots] even with corrupted counters)."""
        w, r = self.counters()
        return min(max(0, w - r), self.slots)

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

    def mark_closed(self) -> None:
        """Consumer: tell producers the ring goes away (they stop writing and detach)."""
        self._live(faulted=True)[_W_CLOSED] = 1

    def _live(self, *, faulted: bool = False) -> np.ndarray:
        """The header words, once ``fstat`` shows that the segment still has the size its
        header gives. :class:`RingError` when this end closed the ring; :class:`RingFault` when
        the segment is smaller (its mapping is then never touched again), or when this end
        found the ring faulty before, unless ``faulted`` (salvaging a ring with bad counters)."""
        words = self._words
        if words is None:
            raise RingError(f"shm ring {self.name!r} is closed on this side")
        if self.fault is not None and (self.truncated or not faulted):
            raise RingFault(f"shm ring {self.name!r} {self.fault}", truncated=self.truncated)
        try:
            size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise self._fail(f"cannot be checked ({exc})", truncated=True) from None
        if size < self._size:
            raise self._fail(f"was truncated to {size} bytes under a running ring (its header "
                             f"says {self._size})", truncated=True)
        return words

    def _fail(self, why: str, *, truncated: bool) -> RingFault:
        """Record that this end stops using the ring; the error to raise."""
        if self.fault is None:
            self.fault = why
            self._salvage_from = self._r
        if truncated and not self.truncated:
            self.fault, self.truncated = why, True
        return RingFault(f"shm ring {self.name!r} {why}", truncated=self.truncated)

    def _pwrite(self, parts: tuple[bytes | bytearray, ...], offset: int) -> None:
        """Write ``parts`` at ``offset`` through the descriptor (never SIGBUS: a truncated
        segment grows again or the write fails); RingFault when it fails."""
        total = sum(len(p) for p in parts)
        try:
            done = os.pwritev(self._fd, parts, offset)
            if done < total:                      # rare: finish a short write
                rest = b"".join(parts)[done:]
                while rest:
                    n = os.pwrite(self._fd, rest, offset + done)
                    if n <= 0:
                        raise OSError(f"short write at byte {offset + done}")
                    done, rest = done + n, rest[n:]
        except OSError as exc:                     # e.g. ENOSPC: /dev/shm is full
            raise self._fail(f"cannot be written ({exc})", truncated=False) from None

    def _pread(self, offset: int, out: bytearray | memoryview, *, faulted: bool) -> None:
        """Fill ``out`` from ``offset`` through the descriptor (never SIGBUS: a truncated
        segment reads short); RingFault when it comes back short."""
        view = memoryview(out)
        done = 0
        try:
            while done < len(view):
                n = os.preadv(self._fd, [view[done:]], offset + done)
                if n <= 0:
                    self._live(faulted=faulted)   # raises when the segment got smaller
                    raise OSError(f"short read at byte {offset + done}")
                done += n
        except OSError as exc:
            raise self._fail(f"cannot be read ({exc})", truncated=True) from None
        finally:
            view.release()

    # ------------------------------------------------------------------ producer

    def _producer_read(self, words: np.ndarray) -> int:
        """The read counter, once the counters agree with this producer's own; else RingFault
        (a changed write counter is first put back: the producer owns that word, and the
        batches it published stay readable)."""
        r, w, rid = int(words[_W_READ]), int(words[_W_WRITE]), int(words[_W_ID])
        if w == self._w and 0 <= w - r <= self.slots and rid == self.ring_id:
            return r
        note = ""
        if rid == self.ring_id and w != self._w and 0 <= self._w - r <= self.slots:
            words[_W_WRITE] = self._w
            note = f"; put {self._w} back"
        raise self._fail(f"has inconsistent counters (write counter {w} where this producer "
                         f"wrote {self._w}, read counter {r}, {self.slots} slots, ring id "
                         f"{rid:#x} for {self.ring_id:#x}){note}", truncated=False)

    def full(self) -> bool:
        """True when no slot is free (producer side); RingFault on a damaged ring."""
        return self._w - self._producer_read(self._live()) >= self.slots

    def write(self, run: str, stream: str, headers: Mapping[str, str], body: bytes) -> bool:
        """Publish one encoded batch (``headers, body = encode_batch(...)``); False when full.

        ValueError when ``body`` does not fit a slot or a name is invalid; RingFault when the
        segment was truncated or its counters are inconsistent (nothing is published).
        """
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
        if w - self._producer_read(self._live()) >= self.slots:
            return False
        off = HEADER_SIZE + (w % self.slots) * self.slot_size
        head = bytearray(SLOT_HEADER - 8)         # the slot from byte 8 to the payload
        _SLOT_REST.pack_into(head, 0, len(body), b, d, -1 if step is None else step,
                             _DTYPES.index(dtype), int(has_labels), len(rb), len(sb))
        head[56:56 + len(rb)] = rb
        head[184:184 + len(sb)] = sb
        self._pwrite((head, body), off + 8)
        self._pwrite((_SEQ.pack(w),), off)        # last: the slot is complete
        self._live()[_W_WRITE] = w + 1            # publish: one aligned 8-byte store, last
        self._w = w + 1
        return True

    # ------------------------------------------------------------------ consumer

    def read(self, *, salvage: bool = False) -> ShmBatch | None:
        """The oldest unread batch (its payload is this end's own copy: the slot may be
        released with :meth:`advance` at once), or None when empty. RingError when the slot is
        inconsistent (the caller then calls :meth:`advance` to skip it); RingFault when the
        ring is damaged (truncated, counters inconsistent, two slots in a row not holding the
        batch announced).

        ``salvage``: after a fault that left the slots intact, read by the slots' ``seq``
        instead of the write counter (None at the first slot that does not hold the next
        batch, and after ``slots`` batches).
        """
        r = self._r
        if salvage:
            self._live(faulted=True)
            if r - self._salvage_from >= self.slots:
                return None
        else:
            words = self._live()
            rr, w, rid = int(words[_W_READ]), int(words[_W_WRITE]), int(words[_W_ID])
            if rr != r or not 0 <= w - r <= self.slots or rid != self.ring_id:
                raise self._fail(f"has inconsistent counters (write counter {w}, read counter "
                                 f"{rr} where this consumer read {r}, {self.slots} slots, ring "
                                 f"id {rid:#x} for {self.ring_id:#x})", truncated=False)
            if w == r:
                return None
        off = HEADER_SIZE + (r % self.slots) * self.slot_size
        head = bytearray(SLOT_HEADER)
        self._pread(off, head, faulted=salvage)
        seq, n, b, d, step, dt, lab, lr, ls = _SLOT.unpack_from(head, 0)
        if seq != r:
            if salvage:
                return None
            self._bad_seq += 1
            if self._bad_seq > 1:
                raise self._fail(f"announces batch {r}, but its slot holds {seq} (two slots in "
                                 "a row: the write counter is wrong)", truncated=False)
        else:
            self._bad_seq = 0
        if seq != r or n > self.max_payload or dt >= len(_DTYPES) or lab > 1 or not (
                1 <= lr <= 128 and 1 <= ls <= 128):
            raise RingError(f"shm ring {self.name!r}: slot of batch {r} is inconsistent "
                            f"(seq {seq}, length {n}, dtype code {dt})")
        try:
            run = bytes(head[64:64 + lr]).decode("ascii")
            stream = bytes(head[192:192 + ls]).decode("ascii")
        except UnicodeDecodeError:
            raise RingError(f"shm ring {self.name!r}: batch {r} has non-ASCII names") from None
        payload = bytearray(n)                    # short when truncated meanwhile: RingFault
        self._pread(off + SLOT_HEADER, payload, faulted=salvage)
        headers = {"Content-Type": wire.CONTENT_TYPE_RAW, wire.H_DTYPE: _DTYPES[dt],
                   wire.H_SHAPE: f"{b},{d}"}
        if lab:
            headers[wire.H_LABELS] = "int64"
        if step >= 0:
            headers[wire.H_STEP] = str(step)
        return ShmBatch(run, stream, headers, memoryview(payload))

    def advance(self) -> None:
        """Consumer: release the slot of the batch returned by :meth:`read` (or skip a bad
        one). While salvaging a faulty ring only this end's own copy moves."""
        self._r += 1
        if self.fault is None:
            self._live()[_W_READ] = self._r       # one aligned 8-byte store

    def __repr__(self) -> str:
        if self.closed:
            state = "closed"
        elif self.fault is not None:
            state = f"faulty: {self.fault}"
        else:
            try:
                state = f"pending={self.pending()}"
            except RingError as exc:
                state = f"faulty: {exc}"
        return (f"ShmRing({self.name!r}, slots={self.slots}, slot_size={self.slot_size}, "
                f"{'owner' if self.owner else 'attached'}, {state})")


@dataclass
class ShmBatch:
    """One batch read from a ring: names, the wire headers, and the raw body (a view of a
    ``bytearray`` that belongs to this batch alone)."""

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
    another producer, its heartbeat is older than ``stale_after`` seconds, or it is damaged
    (truncated, inconsistent counters: :class:`RingFault`); the transport then detaches and
    re-attaches on a later batch. ``queue_full`` when the ring is full (checked before the batch
    is encoded); ``rejected`` for a batch larger than a slot. :meth:`drained` is True once the
    sidecar has read everything out of the ring.
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

    def _detach(self, why: str) -> Drop:
        """Stop using the ring (a later batch attaches again): the batch is ``sidecar_down``."""
        self.close()
        return Drop("sidecar_down", why)

    def ready(self) -> Drop | None:
        ring = self._ring
        if ring is None:
            try:
                ring = self._ring = self._attach()
            except FileNotFoundError:
                return Drop("sidecar_down", "no shared-memory ring of that name (is `repwatch "
                                            "serve --shm` running?)")
            except PermissionError as exc:
                return Drop("sidecar_down",
                            f"{exc} (trainer and sidecar must run as the same user)")
            except (RingError, OSError, ValueError) as exc:
                return Drop("sidecar_down", str(exc))
        try:
            why = ring.down(self.stale_after)
            if why:
                return self._detach(f"ring {why}")
            return Drop("queue_full") if ring.full() else None  # before encoding a batch
        except RingError as exc:                    # damaged: truncated, bad counters
            return self._detach(f"{exc}; detached, a later batch re-attaches")

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
        try:
            return None if ring.write(run, stream, headers, body) else Drop("queue_full")
        except RingError as exc:                    # truncated, or inconsistent counters
            return self._detach(f"{exc}; detached, a later batch re-attaches")

    def drained(self) -> bool:
        ring = self._ring
        try:
            return ring is None or ring.closed or ring.pending() == 0 or bool(
                ring.down(self.stale_after))
        except Exception:  # noqa: BLE001 - detached meanwhile, or a damaged ring
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

    A damaged ring (:class:`RingFault`: truncated, inconsistent counters) never ends the
    thread: the fault is counted (``faults``, and ``sidecar.reject("bad_request")``), the first
    one logged, and the ring re-created under the same name (a new ring id; trainers detach
    from the old one and attach to it). The slots of a ring with bad counters are still read,
    by their ``seq``, until its producer has left (see the module's Faults). When the name
    cannot be created again (another sidecar took it, ``/dev/shm`` is full) the reader tries
    again every second.
    """

    def __init__(self, spec: str, sidecar: Any, *, stale_after: float = 5.0,
                 idle_sleep: float = 0.005) -> None:
        self.spec = parse_spec(spec)
        self.sidecar = sidecar
        self.stale_after = float(stale_after)
        self.idle_sleep = float(idle_sleep)
        self.read_batches = 0
        self.faults = 0
        self.ring: ShmRing | None = None
        self._old: ShmRing | None = None          # a faulty ring whose slots are salvaged
        self._old_until = 0.0
        self._retry_at = 0.0
        self._lock = threading.Lock()             # self.ring against stop()
        self._stopping = False
        self._stop = threading.Event()
        self._logged: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name="repwatch-shm-reader",
                                        daemon=True)

    def start(self) -> Self:
        """Create the ring (FileExistsError when a live sidecar serves it) and start reading."""
        self.ring = self._create()
        self._thread.start()
        return self

    def _create(self) -> ShmRing:
        return ShmRing.create(self.spec.name, self.spec.slots or DEFAULT_SLOTS,
                              self.spec.slot_size, stale_after=self.stale_after)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Mark the ring closed, hand what is in it to the sidecar (at most ``timeout`` s),
        stop the thread, unlink the segment. Idempotent."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True                 # no ring is created after this
            ring = self.ring
        if ring is not None:
            try:
                ring.mark_closed()                # producers stop writing, then we drain
            except RingError:
                pass
        deadline = time.monotonic() + timeout
        while (ring is not None and self._thread.is_alive() and _pending(ring)
               and time.monotonic() < deadline):
            time.sleep(0.005)
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(max(0.1, deadline - time.monotonic()))
        rings = [r for r in (self.ring, self._old) if r is not None]
        if not self._thread.is_alive():
            self._old = None
            for r in rings:
                r.close()
        else:  # cannot unmap under a running reader; unlink only (the mapping goes at exit)
            for r in rings:
                r.unlink()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        sleep = self.idle_sleep / 16
        last_beat = 0.0
        while not self._stop.is_set():
            ring = self.ring
            if ring is None:                      # re-creating failed: try again now and then
                ring = self._recreate() if time.monotonic() >= self._retry_at else None
                if ring is None:
                    time.sleep(self.idle_sleep)
                    continue
            try:
                now = time.monotonic()
                if now - last_beat > 0.05:
                    ring.beat()
                    last_beat = now
                if getattr(self.sidecar, "saturated", False):
                    time.sleep(self.idle_sleep)   # backpressure: leave batches in the ring
                    continue
                got = self._salvage() if self._old is not None else False
                got = self._take(ring) or got
            except RingFault as exc:
                self._on_fault(ring, exc)
                got = True
            except Exception as exc:  # noqa: BLE001 - never let the reader die
                self._log_once("error", f"repwatch shm reader: {type(exc).__name__}: {exc}")
                got = True
            if got:
                sleep = self.idle_sleep / 16
            else:
                time.sleep(sleep)
                sleep = min(sleep * 2, self.idle_sleep)

    def _on_fault(self, ring: ShmRing, exc: RingFault) -> None:
        """Count the fault, retire ``ring`` and create the ring anew under the same name."""
        self.faults += 1
        self.sidecar.reject("bad_request")
        self._log_once("fault", f"repwatch shm reader: {exc}. Counted as a rejected request "
                                f"(bad_request); the ring is re-created under the same name "
                                f"and trainers re-attach (further faults are only counted)")
        try:
            ring.mark_closed()                    # producers still on it leave (not truncated)
        except RingError:
            pass
        ring.unlink()
        if exc.truncated:
            ring.close()                          # never touches the mapping
        else:                                     # the slots are sound: read what they hold
            if self._old is not None:
                self._old.close()
            self._old, self._old_until = ring, time.monotonic() + self.stale_after
        self._recreate()

    def _recreate(self) -> ShmRing | None:
        with self._lock:
            self.ring = None
            if self._stopping:
                return None
            try:
                self.ring = self._create()
            except (OSError, ValueError) as exc:  # the name was taken, /dev/shm is full, ...
                self._retry_at = time.monotonic() + 1.0
                self._log_once("recreate", f"repwatch shm reader: cannot create ring "
                                           f"{self.spec.name!r} again ({exc}); retrying every "
                                           "second")
            return self.ring

    def _salvage(self) -> bool:
        """Read what the faulty ring ``_old`` still holds, by slot ``seq``; retire it once no
        producer claims it (checked before the last pass: nothing is written after that) or
        ``stale_after`` s passed."""
        old = self._old
        assert old is not None
        got = False
        try:
            last = time.monotonic() > self._old_until or not old.has_producer()
            while self._take(old, salvage=True):
                got = True
        except RingError:                         # truncated meanwhile: nothing more to save
            last = True
        if last:
            self._old = None
            old.close()
        return got

    def _take(self, ring: ShmRing, *, salvage: bool = False) -> bool:
        try:
            item = ring.read(salvage=salvage)
        except RingFault:
            raise
        except RingError as exc:                  # one inconsistent slot: counted, skipped
            ring.advance()
            self._reject("bad_request", str(exc))
            return True
        if item is None:
            return False
        fault = None
        try:
            ring.advance()                        # the batch is our own copy already
        except RingFault as exc:
            fault = exc                           # deliver it first
        self._deliver(item)
        if fault is not None:
            raise fault
        return True

    def _deliver(self, item: ShmBatch) -> None:
        try:
            if not (is_name(item.run) and is_name(item.stream)):
                raise wire.ProtocolError(422, f"bad run/stream names {item.run!r}/{item.stream!r}")
            cfg = self.sidecar.config
            body = item.payload.obj               # the batch's own bytearray: no copy of rows
            rows, labels, step = wire.decode_batch(
                item.headers, body if isinstance(body, bytearray) else item.payload,
                max_rows=cfg.max_rows_per_batch, max_dim=cfg.max_dim, owned=True)
        except wire.ProtocolError as exc:
            reason = {415: "unsupported", 422: "invalid"}.get(exc.status, "bad_request")
            self._reject(reason, exc.message)
            return
        finally:
            item.payload.release()
        self.read_batches += 1
        self._wait_for_room(item.run)
        try:
            self.sidecar.submit(item.run, item.stream, rows, labels, step)
        except Rejected as exc:
            if exc.reason in REJECT_REASONS:
                self.sidecar.reject(exc.reason)
            self._log_once(exc.reason, f"repwatch shm reader: batch of {item.run!r}/"
                                       f"{item.stream!r} refused: {exc.message} (further ones "
                                       "are only counted)")

    def _wait_for_room(self, run: str) -> None:
        """Backpressure per run: while ``run`` holds its share of the sidecar's queue
        (``sidecar.has_room``), wait (the ring keeps the later batches; its heartbeat goes on)."""
        room = getattr(self.sidecar, "has_room", None)
        while room is not None and not room(run) and not self._stop.is_set():
            ring = self.ring
            if ring is not None:
                try:
                    ring.beat()
                except RingError:                 # the loop sees the fault next
                    return
            time.sleep(self.idle_sleep)

    def _reject(self, reason: str, message: str) -> None:
        self.sidecar.reject(reason)
        self._log_once(reason, f"repwatch shm reader: dropped a batch ({message}); further "
                               "ones are only counted")

    def _log_once(self, key: str, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning("%s", message)


def _pending(ring: ShmRing) -> int:
    try:
        return ring.pending()
    except RingError:
        return 0


__all__ = ["DEFAULT_SLOTS", "DEFAULT_SLOT_MB", "RingError", "RingFault", "RingSpec", "ShmBatch",
           "ShmReader", "ShmRing", "ShmTransport", "parse_spec", "unlink_segment"]

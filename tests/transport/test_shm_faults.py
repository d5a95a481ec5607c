"""Faults of the shared-memory ring under running ends (``monitor/transport/shm.py``).

A segment truncated under a trainer and a sidecar (``os.truncate``, ``echo x > /dev/shm/NAME``)
must not end either process with SIGBUS, and a corrupted write counter must not lose batches
silently: both ends detect the fault, count it, and the sidecar re-creates the ring, to which
the trainer re-attaches. The consumer (:class:`ShmReader` over a small fake sidecar) runs in the
test process, the producer (a real ``ShmSink``) in a subprocess driven over stdin.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from monitor.transport.shm import RingError, RingFault, ShmReader, ShmRing, ShmTransport
from monitor.transport.wire import encode_batch
from tests.transport.waiting import wait_until as _wait

ROOT = Path(__file__).resolve().parents[2]
SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="needs POSIX shared memory (/dev/shm)")

SLOTS = 8
RING = "{name}?slots=8&slot_mb=0.0625"       # 8 slots of 64 KiB: a 0.5 MiB segment
FULL_SIZE = 256 + SLOTS * ((1 << 16) + 320)




class FakeSidecar:
    """What :class:`ShmReader` needs of a sidecar: ``config`` limits, ``submit``, ``reject``."""

    def __init__(self) -> None:
        self.config = SimpleNamespace(max_rows_per_batch=4096, max_dim=4096)
        self.saturated = False
        self.steps: list[int] = []
        self.rejected: dict[str, int] = {}
        self._lock = threading.Lock()

    def submit(self, run: str, stream: str, rows: np.ndarray, labels: np.ndarray | None,
               step: int | None) -> None:
        with self._lock:
            self.steps.append(-1 if step is None else step)

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    @property
    def received(self) -> int:
        return len(self.steps)

    @property
    def rejects(self) -> int:
        with self._lock:
            return sum(self.rejected.values())




def _header(name: str) -> tuple[int, dict[str, int] | None]:
    """(size, header words) of segment ``name``, read with ``pread`` (never faults)."""
    try:
        fd = os.open(SHM / name, os.O_RDONLY)
    except FileNotFoundError:
        return 0, None
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, 256, 0)
    finally:
        os.close(fd)
    if len(data) < 256 or data[:8] != b"REPWSHM1":
        return size, None
    w = np.frombuffer(data, dtype=np.uint64)
    return size, {"id": int(w[4]), "closed": int(w[6]), "write": int(w[8]), "read": int(w[16])}


def _ring_id(name: str) -> int | None:
    size, head = _header(name)
    return head["id"] if head is not None and size == FULL_SIZE else None


def _store_write_counter(name: str, value: int) -> None:
    """Store ``value`` into the write counter (byte 64) with one aligned 8-byte store."""
    with open(SHM / name, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 4096)
        words = np.ndarray((32,), dtype=np.uint64, buffer=mm)
        words[8] = value
        del words
        mm.close()


_PRODUCER = textwrap.dedent("""
    import json, logging, sys, threading, time
    import torch
    from monitor.transport import ShmSink

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sink = ShmSink(f"shm://{sys.argv[1]}", run="r", backoff=(0.05, 0.1))
    running, paused, stop = threading.Event(), threading.Event(), threading.Event()
    running.set()

    def listen():
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "pause":
                running.clear()
            elif cmd == "go":
                running.set()
            elif cmd == "stop":
                break
        stop.set()
        running.set()

    threading.Thread(target=listen, daemon=True).start()
    x = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    period = float(sys.argv[2])
    step, deadline = 0, time.monotonic() + 60
    while not stop.is_set() and time.monotonic() < deadline:
        if not running.is_set():           # pause: let everything out, say how much went
            sink.flush(10)
            print("paused", sink.sent_batches, flush=True)
            running.wait(30)
            continue
        sink.submit("s", x + step, None, step)
        step += 1
        time.sleep(period)
    sink.flush(10)
    sink.close(5)
    print(json.dumps({"submitted": step, "sent": sink.sent_batches,
                      "dropped": sink.dropped_batches}), flush=True)
""")


class Producer:
    """A trainer's sink in a subprocess submitting a batch every ``period`` seconds;
    ``pause`` / ``go`` / ``stop`` over stdin."""

    def __init__(self, name: str, period: float = 0.002) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _PRODUCER, name, str(period)],
                                     cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def command(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def pause(self) -> int:
        """Stop submitting, wait until the ring is drained; the batches sent so far."""
        self.command("pause")
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()   # the child flushes within 10 s
        assert line and line[0] == "paused", line
        return int(line[1])

    def finish(self) -> tuple[int, dict[str, Any], str]:
        """Stop; (return code, its counts, its stderr)."""
        if self.alive():
            try:
                self.command("stop")
            except BrokenPipeError:
                pass
        out, err = self.proc.communicate(timeout=60)
        lines = out.strip().splitlines()
        counts = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
        return self.proc.returncode, counts, err

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)


def _check_accounting(counts: dict[str, Any]) -> None:
    """Every submitted batch was sent or counted as dropped, for an allowed reason."""
    dropped = counts["dropped"]
    assert counts["sent"] + sum(dropped.values()) == counts["submitted"], counts
    assert set(dropped) <= {"sidecar_down", "backoff", "queue_full"}, counts


# ---------------------------------------------------------------------------------- truncation

@pytest.mark.e2e
def test_truncated_while_producing_neither_end_dies(name: str) -> None:
    """Truncated under a running trainer: the trainer counts ``sidecar_down`` and lives on,
    the reader counts the fault and re-creates the ring, batches flow again."""
    side = FakeSidecar()
    reader = ShmReader(RING.format(name=name), side).start()
    prod = Producer(name)
    try:
        assert _wait(lambda: side.received >= 20 or not prod.alive(), 30), "no batch arrived"
        assert prod.alive(), prod.proc.communicate(timeout=30)
        old_id = _ring_id(name)
        assert old_id is not None
        os.truncate(SHM / name, 4096)
        at = side.received
        recovered = _wait(lambda: not prod.alive() or (
            _ring_id(name) not in (None, old_id) and side.received >= at + 20), 20)
        code, counts, err = prod.finish()
        assert code == 0, f"the trainer died with {code} (-7: SIGBUS)\n{err[-3000:]}"
        assert recovered, (side.received, at, _header(name))
        assert reader.alive
        _check_accounting(counts)
        assert counts["dropped"].get("sidecar_down", 0) >= 1, counts     # the fault, counted
        assert "truncated" in err or "closed by its sidecar" in err, err[-3000:]
        assert _wait(lambda: side.received >= counts["sent"] - SLOTS, 10)
        lost = counts["sent"] - side.received     # what was in the ring when it was cut
        assert 0 <= lost <= SLOTS, (counts, side.received)
        assert 1 <= side.rejected.get("bad_request", 0) <= 3, side.rejected
        assert side.rejects == side.rejected["bad_request"], side.rejected
    finally:
        prod.kill()
        reader.stop()


@pytest.mark.parametrize("how", ["truncate_to_0", "echo_x"])
def test_truncated_under_the_reader_alone(name: str, how: str) -> None:
    """Only the sidecar runs: it must not fault on its heartbeat; it re-creates the ring, and a
    trainer attaching afterwards delivers."""
    side = FakeSidecar()
    reader = ShmReader(RING.format(name=name), side).start()
    try:
        old_id = _ring_id(name)
        assert old_id is not None
        time.sleep(0.1)                                     # the reader beats and polls
        if how == "truncate_to_0":
            os.truncate(SHM / name, 0)
        else:
            (SHM / name).write_bytes(b"x\n")               # like `echo x > /dev/shm/NAME`
        assert _wait(lambda: _ring_id(name) not in (None, old_id), 10), _header(name)
        assert reader.alive
        assert side.rejected == {"bad_request": 1}
        sink = ShmTransport(f"shm://{name}")
        try:
            assert sink.ready() is None
            headers, body = encode_batch(np.ones((4, 3), np.float32), step=7)
            assert sink.send("r", "s", headers, body) is None
            assert _wait(lambda: side.received == 1, 10)
            assert side.steps == [7]
        finally:
            sink.close()
        time.sleep(0.1)
        assert side.rejected == {"bad_request": 1}         # one fault, counted once
    finally:
        reader.stop()


# ---------------------------------------------------------------------------------- counters

@pytest.mark.e2e
def test_corrupted_write_counter_loses_nothing_silently(name: str) -> None:
    """The write counter jumps to 1 << 40 with the ring drained: nothing is counted as sent that
    the sidecar did not get, the reader does not spin on rejects, later batches arrive."""
    side = FakeSidecar()
    reader = ShmReader(RING.format(name=name), side).start()
    prod = Producer(name)
    try:
        assert _wait(lambda: side.received >= 10 or not prod.alive(), 30), "no batch arrived"
        sent = prod.pause()
        assert _wait(lambda: side.received == sent, 10), (side.received, sent)
        _store_write_counter(name, 1 << 40)
        time.sleep(0.2)                                     # the reader sees it first
        prod.command("go")
        assert _wait(lambda: side.received >= sent + 20 or not prod.alive(), 20), (
            side.received, sent, side.rejected)
        code, counts, err = prod.finish()
        assert code == 0, err[-3000:]
        _check_accounting(counts)
        assert _wait(lambda: side.received >= counts["sent"], 10)
        assert side.received == counts["sent"], (counts, side.received)   # no silent loss
        assert side.steps == sorted(side.steps)
        assert counts["dropped"].get("sidecar_down", 0) + side.rejects >= 1  # it was seen
        assert side.rejects <= 3, side.rejected                           # and not a spin
        assert reader.alive
        head = _header(name)[1]
        assert head is not None and 0 <= head["write"] - head["read"] <= SLOTS, head
    finally:
        prod.kill()
        reader.stop()


@pytest.mark.e2e
def test_corrupted_write_counter_while_producing(name: str) -> None:
    """The same while the trainer sends a batch every 20 ms (twice, so that at least one event
    lands outside the instant in which the producer's own store overwrites it): every batch
    counted as sent arrives, rejects stay a handful, delivery goes on."""
    side = FakeSidecar()
    reader = ShmReader(RING.format(name=name), side).start()
    prod = Producer(name, period=0.02)
    try:
        for _ in range(2):
            at = side.received
            assert _wait(lambda at=at: side.received >= at + 20 or not prod.alive(), 30), (
                side.received, side.rejected)
            _store_write_counter(name, 1 << 40)
            time.sleep(0.3)                                 # handled: sane counters again
            assert _wait(lambda: (lambda h: h is not None and 0 <= h["write"] - h["read"]
                                  <= SLOTS)(_header(name)[1]), 5), _header(name)
        at = side.received
        assert _wait(lambda: side.received >= at + 20 or not prod.alive(), 20), side.received
        code, counts, err = prod.finish()
        assert code == 0, err[-3000:]
        _check_accounting(counts)
        assert _wait(lambda: side.received >= counts["sent"], 10)
        assert side.received == counts["sent"], (counts, side.received)   # no silent loss
        assert side.steps == sorted(side.steps)
        assert counts["dropped"].get("sidecar_down", 0) + side.rejects >= 1
        assert side.rejects <= 6, side.rejected
        assert reader.alive
    finally:
        prod.kill()
        reader.stop()


# ---------------------------------------------------------------------------------- one process

def _batch(step: int) -> tuple[dict[str, str], bytes]:
    return encode_batch(np.full((2, 3), step, np.float32), step=step)


def _steps(ring: ShmRing, *, salvage: bool = False) -> list[int]:
    out = []
    while (item := ring.read(salvage=salvage)) is not None:
        out.append(int(item.headers["X-Repwatch-Step"]))
        item.payload.release()
        ring.advance()
    return out


@pytest.mark.parametrize("size", [0, 2, 4096])
def test_every_accessor_checks_a_truncated_segment_first(name: str, size: int) -> None:
    """Each path that would touch the mapping of a truncated segment raises RingFault (or says
    the ring is down) instead: any access would end this test process with SIGBUS."""
    ring = ShmRing.create(name, slots=4, slot_size=8192)
    sink = ShmTransport(f"shm://{name}")
    try:
        assert sink.ready() is None and sink.send("r", "s", *_batch(0)) is None
        prod = sink._ring
        assert prod is not None
        os.truncate(SHM / name, size)
        for call in (lambda r: r.write("r", "s", *_batch(1)), lambda r: r.full(),
                     lambda r: r.down(5.0), lambda r: r.counters(), lambda r: r.pending(),
                     lambda r: r.read(), lambda r: r.read(salvage=True), lambda r: r.beat(),
                     lambda r: r.mark_closed()):
            for end in (prod, ring):
                with pytest.raises(RingFault, match="truncated") as info:
                    call(end)
                assert info.value.truncated
        assert "faulty" in repr(prod)
        assert sink.drained()                               # nothing more will leave
        drop = sink.ready()                                 # detaches; the next one attaches
        assert drop is not None and drop.reason == "sidecar_down" and "truncated" in drop.message
        assert sink._ring is None and prod.closed
        drop = sink.ready()
        assert drop is not None and drop.reason == "sidecar_down"   # not a ring (yet)
    finally:
        sink.close()
        ring.close()                                        # unlinks without touching it
    assert not (SHM / name).exists()


def test_producer_puts_back_a_changed_write_counter(name: str) -> None:
    """The producer owns the write counter: when it changed, the producer stores its own value
    back (what it published stays readable), counts the batch ``sidecar_down`` and detaches."""
    ring = ShmRing.create(name, slots=4, slot_size=8192)
    sink = ShmTransport(f"shm://{name}")
    try:
        for i in range(3):
            assert sink.ready() is None and sink.send("r", "s", *_batch(i)) is None
        assert ring._words is not None
        ring._words[8] = 1 << 40                            # the write counter
        drop = sink.ready()
        assert drop is not None and drop.reason == "sidecar_down"
        assert "inconsistent counters" in drop.message and "put 3 back" in drop.message
        assert ring.counters() == (3, 0) and sink._ring is None
        assert _steps(ring) == [0, 1, 2]                    # nothing published is lost
        assert sink.ready() is None                         # re-attached: consistent again
        assert sink.send("r", "s", *_batch(3)) is None
        assert _steps(ring) == [3]
        ring._words[16] = 9                                 # a read counter ahead of write 4
        drop = sink.send("r", "s", *_batch(4))
        assert drop is not None and drop.reason == "sidecar_down"
        assert "read counter 9" in drop.message and "put" not in drop.message
        with pytest.raises(RingError, match="inconsistent counters"):
            ShmRing.attach(name)                            # attach refuses it too
    finally:
        sink.close()
        ring.close()


def test_consumer_checks_its_counters_and_salvages_by_seq(name: str) -> None:
    """A write counter out of range is a fault for the consumer; the slots it left intact are
    still read, by their seq, and only this end's copy of the read counter moves."""
    ring = ShmRing.create(name, slots=4, slot_size=8192)
    prod = ShmRing.attach(name)
    try:
        for i in range(3):
            assert prod.write("r", "s", *_batch(i))
        assert ring.read() is not None
        ring.advance()
        assert ring._words is not None
        ring._words[8] = 1 << 40
        for _ in range(2):
            with pytest.raises(RingFault, match="inconsistent counters") as info:
                ring.read()
            assert not info.value.truncated
        assert _steps(ring, salvage=True) == [1, 2]
        assert ring.counters() == (1 << 40, 1)             # the faulty header is left alone
    finally:
        prod.close()
        ring.close()
    ring = ShmRing.create(name, slots=4, slot_size=8192)
    prod = ShmRing.attach(name)
    try:
        for i in range(3):
            assert prod.write("r", "s", *_batch(i))
        assert ring._words is not None
        ring._words[16] = 2                                 # a read counter that moved
        with pytest.raises(RingFault, match=r"read counter 2 where this consumer read 0"):
            ring.read()
        assert _steps(ring, salvage=True) == [0, 1, 2]
    finally:
        prod.close()
        ring.close()


@pytest.mark.parametrize("bad", [1, 2])
def test_one_bad_slot_is_skipped_two_in_a_row_are_a_fault(name: str, bad: int) -> None:
    ring = ShmRing.create(name, slots=4, slot_size=8192)
    prod = ShmRing.attach(name)
    try:
        for i in range(3):
            assert prod.write("r", "s", *_batch(i))
        assert ring._buf is not None
        for slot in range(bad):                              # their seq says another batch
            ring._buf[256 + slot * 8192:264 + slot * 8192] = (99).to_bytes(8, "little")
        with pytest.raises(RingError, match="inconsistent") as info:
            ring.read()
        assert not isinstance(info.value, RingFault)
        ring.advance()
        if bad == 1:
            assert _steps(ring) == [1, 2]
        else:
            with pytest.raises(RingFault, match="two slots in a row"):
                ring.read()
    finally:
        prod.close()
        ring.close()


def test_reader_retries_when_the_ring_cannot_be_created_again(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    side = FakeSidecar()
    reader = ShmReader(RING.format(name=name), side).start()
    try:
        create, calls = reader._create, []

        def failing() -> ShmRing:
            calls.append(time.monotonic())
            if len(calls) == 1:
                raise OSError(28, "No space left on device")
            return create()

        monkeypatch.setattr(reader, "_create", failing)
        os.truncate(SHM / name, 0)
        assert _wait(lambda: len(calls) == 2, 10) and reader.alive
        assert 0.9 < calls[1] - calls[0] < 5                  # once a second
        assert _wait(lambda: _ring_id(name) is not None, 5)
        assert side.rejected == {"bad_request": 1}
    finally:
        reader.stop()

"""The shared-memory ring transport of sidecar mode (``monitor/transport/shm.py``, ``ShmSink``).

Every test uses its own segment name and a fixture checks that none is left in ``/dev/shm``.
The consumer side decodes with a reference decoder written from the protocol text, not with
``decode_batch``, where the test is about the bytes in the ring.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from monitor import Monitor
from monitor.server import BackgroundServer
from monitor.sidecar.service import Sidecar, SidecarConfig, create_sidecar_app
from monitor.transport import ShmSink, make_sink
from monitor.transport.shm import RingError, ShmReader, ShmRing, parse_spec
from monitor.transport.wire import encode_batch
from tests.toy_training import train_toy
from tests.transport.waiting import wait_until as _wait

ROOT = Path(__file__).resolve().parents[2]
SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="needs POSIX shared memory (/dev/shm)")




def _ref_decode(headers: dict[str, str], payload: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """Reference decoder of the raw form (float32 / float16 only), from the protocol text."""
    b, d = (int(v) for v in headers["X-Repwatch-Shape"].split(","))
    dt = {"float32": "<f4", "float16": "<f2"}[headers["X-Repwatch-Dtype"]]
    size = np.dtype(dt).itemsize * b * d
    rows = np.frombuffer(payload[:size], dtype=dt).astype(np.float32).reshape(b, d)
    labels = None
    if "X-Repwatch-Labels" in headers:
        labels = np.frombuffer(payload[size:], dtype="<i8").copy()
    else:
        assert len(payload) == size
    return rows, labels


def _read_all(ring: ShmRing) -> list[tuple[str, str, dict[str, str], bytes]]:
    out = []
    while (item := ring.read()) is not None:
        out.append((item.run, item.stream, dict(item.headers), bytes(item.payload)))
        item.payload.release()
        ring.advance()
    return out




# ---------------------------------------------------------------------------------- the ring

def test_parse_spec() -> None:
    assert parse_spec("shm://ring") == parse_spec("ring")
    spec = parse_spec("shm://r-1.a?slots=8&slot_mb=0.5")
    assert (spec.name, spec.slots, spec.slot_mb) == ("r-1.a", 8, 0.5)
    assert spec.slot_size == (1 << 19) + 320                       # payload + slot header
    assert parse_spec("shm://ring").slot_size == (4 << 20) + 320   # default: 4 MiB bodies
    for bad, msg in [("shm://", "name must be"), ("shm://a/b", "name must be"),
                     ("shm://.hidden", "name must be"), ("shm://r?slots=0", "slots must be"),
                     ("shm://r?slots=x", "slots must be"), ("shm://r?slot_mb=0", "slot_mb must"),
                     ("shm://r?size=3", "options are slots and slot_mb"),
                     ("shm://r?slots=65536&slot_mb=1024", "at most")]:
        with pytest.raises(ValueError, match=msg):
            parse_spec(bad)


def test_wraparound_keeps_order_and_bytes(name: str) -> None:
    ring = ShmRing.create(name, slots=3, slot_size=8192)
    prod = ShmRing.attach(name)
    rng = np.random.default_rng(0)
    sent, got = [], []
    try:
        for i in range(25):                    # 25 batches through 3 slots: 8 wraps
            b, d = 1 + i % 7, 2 + i % 5
            x = rng.standard_normal((b, d)).astype(np.float32)
            labels = rng.integers(0, 10, b) if i % 2 else None
            dtype = "float16" if i % 3 == 0 else "float32"
            headers, body = encode_batch(x, labels=labels, step=i if i % 4 else None, dtype=dtype)
            assert prod.write("run.a", f"s{i % 2}", headers, body)
            sent.append((x.astype(dtype).astype(np.float32), labels, i if i % 4 else None))
            if i % 3 == 2:                     # consumer lags by up to 3, never more
                assert prod.full()
                got += _read_all(ring)
        got += _read_all(ring)
        assert ring.counters() == (25, 25) and prod.pending() == 0
    finally:
        prod.close()
        ring.close()
    assert len(got) == 25
    for i, ((run, stream, headers, payload), (x, labels, step)) in enumerate(
            zip(got, sent, strict=True)):
        assert (run, stream) == ("run.a", f"s{i % 2}")
        rows, lab = _ref_decode(headers, payload)
        np.testing.assert_array_equal(rows, x)
        if labels is None:
            assert lab is None
        else:
            np.testing.assert_array_equal(lab, labels)
        assert headers.get("X-Repwatch-Step") == (None if step is None else str(step))


def test_full_ring_refuses_and_inconsistent_slot_is_detected(name: str) -> None:
    ring = ShmRing.create(name, slots=2, slot_size=4096)
    prod = ShmRing.attach(name)
    try:
        h, body = encode_batch(np.ones((2, 2), np.float32), step=1)
        assert prod.write("r", "s", h, body) and prod.write("r", "s", h, body)
        assert not prod.write("r", "s", h, body)                   # full: refused, not written
        assert ring.counters() == (2, 0)
        with pytest.raises(ValueError, match="does not fit a slot of 3776 payload bytes"):
            prod.write("r", "s", *encode_batch(np.ones((100, 10), np.float32)))
        ring._buf[256:264] = (99).to_bytes(8, "little")            # corrupt slot 0's seq
        with pytest.raises(RingError, match="inconsistent"):
            ring.read()
    finally:
        prod.close()
        ring.close()


def test_attach_errors_and_stale_replacement(name: str) -> None:
    with pytest.raises(FileNotFoundError):
        ShmRing.attach(name)
    ring = ShmRing.create(name, slots=2, slot_size=4096)
    try:
        with pytest.raises(FileExistsError, match="already served by a live sidecar"):
            ShmRing.create(name, slots=2, slot_size=4096)
        ring._words[7] = time.time_ns() - 10 * 10**9                # heartbeat 10 s old
        with pytest.raises(RingError, match="stale heartbeat"):
            ShmRing.attach(name, stale_after=5.0)
        fresh = ShmRing.create(name, slots=4, slot_size=4096)      # replaces the stale ring
        try:
            assert fresh.ring_id != ring.ring_id
            other = ShmRing.attach(name)
            assert other.slots == 4
            other.close()
        finally:
            fresh.close()
        ring.owner = False                     # its name now belongs to nobody; just unmap
    finally:
        ring.close()
    garbage = ShmRing.create(name, slots=1, slot_size=4096)
    try:
        garbage._buf[0:8] = b"NOTARING"
        with pytest.raises(RingError, match="not a repwatch ring"):
            ShmRing.attach(name)
    finally:
        garbage.close()


_PRODUCER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from monitor.transport.shm import ShmRing
    from monitor.transport.wire import encode_batch
    ring = ShmRing.attach(sys.argv[1])
    full = 0
    for i in range(int(sys.argv[2])):
        x = (np.arange(64 * 32, dtype=np.float32).reshape(64, 32) + i)
        headers, body = encode_batch(x, labels=np.full(64, i), step=i)
        while not ring.write("proc", "enc", headers, body):
            full += 1
            time.sleep(0.0005)
    ring.close()
    print("done", full, "torch" in sys.modules)
""")


@pytest.mark.e2e
def test_producer_and_consumer_in_two_processes(name: str) -> None:
    n = 300
    ring = ShmRing.create(name, slots=4, slot_size=16384)
    try:
        child = subprocess.Popen([sys.executable, "-c", _PRODUCER, name, str(n)], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        got = []
        deadline = time.monotonic() + 30
        while len(got) < n and time.monotonic() < deadline:
            batch = _read_all(ring)
            got += batch
            if not batch:
                time.sleep(0.0005)
        out, err = child.communicate(timeout=30)
    finally:
        ring.close()
    assert child.returncode == 0, err
    assert out.split()[0] == "done" and out.split()[2] == "False"   # the producer needs no torch
    assert "resource_tracker" not in err and "leaked" not in err, err
    assert len(got) == n
    base = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    for i, (run, stream, headers, payload) in enumerate(got):      # in order, intact
        rows, labels = _ref_decode(headers, payload)
        assert (run, stream, headers["X-Repwatch-Step"]) == ("proc", "enc", str(i))
        np.testing.assert_array_equal(rows, base + i)
        np.testing.assert_array_equal(labels, np.full(64, i))


# ---------------------------------------------------------------------------------- ShmSink

def test_sink_full_ring_drops_are_counted_exactly(name: str) -> None:
    ring = ShmRing.create(name, slots=4, slot_size=8192)
    sink = ShmSink(f"shm://{name}", run="r")
    try:
        x = torch.randn(10, 6)
        for i in range(10):
            sink.submit("s", x + i, torch.arange(10), i)
            _wait(lambda: sink.queued == 0)               # one at a time: only the ring fills
        assert sink.sent_batches == 4 and sink.sent_rows == 40
        assert sink.counts() == {"queue_full": 60}
        assert sink.dropped_batches == {"queue_full": 6}
        got = _read_all(ring)
        assert [h["X-Repwatch-Step"] for _, _, h, _ in got] == ["0", "1", "2", "3"]
        np.testing.assert_array_equal(_ref_decode(got[2][2], got[2][3])[0], (x + 2).numpy())
        assert sink.flush(30)                              # the ring is drained now
    finally:
        sink.close(1)
        ring.close()


def test_sink_too_large_batch_is_rejected_and_logged_once(
        name: str, caplog: pytest.LogCaptureFixture) -> None:
    ring = ShmRing.create(name, slots=4, slot_size=4096)  # 3776 payload bytes
    sink = ShmSink(f"shm://{name}", run="r")
    try:
        with caplog.at_level(logging.WARNING, logger="repwatch"):
            for i in range(3):
                sink.submit("big", torch.randn(100, 16), None, i)  # 6400 bytes
                _wait(lambda: sink.queued == 0)
            sink.submit("small", torch.randn(4, 16), None, 3)
            _wait(lambda: sink.queued == 0)
        assert sink.counts() == {"rejected": 300}
        assert sink.sent_rows == 4
        lines = [r.getMessage() for r in caplog.records if "more than a slot" in r.getMessage()]
        assert len(lines) == 1 and "6400 bytes" in lines[0] and "3776" in lines[0]
        assert len(_read_all(ring)) == 1
    finally:
        sink.close(1)
        ring.close()


def test_sidecar_absent_then_started_then_stopped(name: str) -> None:
    config = SidecarConfig(backend="torch", every=5, window=256, device="cpu")
    sidecar = Sidecar(config)
    sink = ShmSink(f"shm://{name}", run="r", backoff=(0.05, 0.2))
    reader = None
    try:
        x = torch.randn(8, 4)
        for i in range(5):
            sink.submit("s", x, None, i)
        assert sink.flush(30)
        assert sink.sent_rows == 0 and sink.counts()["sidecar_down"] >= 8
        assert set(sink.counts()) <= {"sidecar_down", "backoff"}
        reader = ShmReader(name, sidecar).start()
        step = 5
        assert _wait(lambda: (sink.submit("s", x, None, step + sink.sent_batches),
                              time.sleep(0.01), sink.sent_batches)[2] > 0, 30)
        assert sink.flush(30)
        before = sink.counts()
        for i in range(5):                                 # after recovery nothing is dropped
            sink.submit("s", x, None, 100 + i)
            assert sink.flush(30)
        assert sink.counts() == before
        assert sidecar.wait_idle(60)
        acc = sidecar.accounting()
        assert acc["received"][("r", "s")] == sink.sent_rows == acc["scored"][("r", "s")]
        reader.stop()                                     # sidecar goes away: closed flag
        assert not (SHM / name).exists()
        sink.submit("s", x, None, 200)
        assert sink.flush(30)
        assert sink.counts()["sidecar_down"] == before["sidecar_down"] + 8
        assert sink.sent_rows + sum(sink.counts().values()) == 8 * (5 + 5 + 1) + 8 * (
            sink.sent_batches + sink.dropped_batches.get("sidecar_down", 0)
            + sink.dropped_batches.get("backoff", 0) - 11)
    finally:
        sink.close(1)
        if reader is not None:
            reader.stop()
        sidecar.close()


def test_sink_detects_a_dead_sidecar_by_its_heartbeat(name: str) -> None:
    ring = ShmRing.create(name, slots=8, slot_size=4096)  # nobody beats: like a SIGKILLed sidecar
    sink = ShmSink(f"shm://{name}", run="r", backoff=(0.05, 0.1), stale_after=0.3)
    try:
        sink.submit("s", torch.randn(2, 3), None, 0)
        assert _wait(lambda: sink.sent_batches == 1, 30)
        time.sleep(0.4)
        sink.submit("s", torch.randn(2, 3), None, 1)
        assert _wait(lambda: sink.queued == 0, 30)
        assert sink.counts() == {"sidecar_down": 2} and sink.transport._ring is None
        assert sink.flush(1)                               # a dead ring is not waited for
    finally:
        sink.close(1)
        ring.close()


def test_make_sink_and_bad_arguments(name: str) -> None:
    sink = make_sink(f"shm://{name}?slots=8", token=None, run="r")
    try:
        assert isinstance(sink, ShmSink) and sink.spec.slots == 8
    finally:
        sink.close(0)
    with pytest.raises(ValueError, match="guarded by the permissions"):
        make_sink(f"shm://{name}", token="t", run="r")
    with pytest.raises(ValueError, match="name must be"):
        ShmSink("shm://a b", run="r")
    with pytest.raises(ValueError, match="stale_after must be"):
        ShmSink(f"shm://{name}", run="r", stale_after=0)
    with pytest.raises(ValueError, match="run must be"):
        ShmSink(f"shm://{name}", run="bad run")
    with pytest.raises(ValueError, match="or shm://NAME"):
        make_sink("ftp://x", token=None, run="r")


# ---------------------------------------------------------------------------------- end to end

def _train(seed: int, sink: str | None, steps: int = 30) -> tuple[list[float], Monitor | None]:
    def monitor(model: nn.Sequential) -> Monitor:
        mon = Monitor(run="shmrun", every=5, max_rows=32, window=256, port=None, seed=123,
                      sink=sink)
        mon.watch(model[1], name="hidden")
        mon.watch(model[4], name="penultimate")
        return mon

    def step(mon: Monitor, logits: torch.Tensor, y: torch.Tensor) -> None:
        mon.step(labels=y)
        mon.sink.flush(30)         # a real step takes longer than this toy one

    losses, mon = train_toy(seed, steps, monitor if sink is not None else None, step)
    if mon is not None:
        mon.close()
    return losses, mon


@pytest.mark.slow
def test_monitor_through_the_ring_to_metrics(name: str) -> None:
    config = SidecarConfig(backend="torch", every=5, window=256, device="cpu")
    sidecar = Sidecar(config)
    server = BackgroundServer(create_sidecar_app(config, sidecar), "127.0.0.1", 0)
    server.start()
    reader = ShmReader(f"{name}?slots=16&slot_mb=0.25", sidecar).start()
    try:
        without, _ = _train(0, None)
        with_sink, mon = _train(0, f"shm://{name}")
        assert with_sink == without                        # bit-identical losses
        assert _train(1, None)[0] != without               # the comparison can fail
        assert mon is not None and mon.sink.counts() == {}
        assert mon.sink.sent_rows == 2 * 30 * 32
        assert sidecar.wait_idle(60)
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        for stream in ("hidden", "penultimate"):
            assert f'repwatch_effective_rank{{run="shmrun",stream="{stream}"}}' in text, text[:3000]
            assert (f'repwatch_received_samples_total{{run="shmrun",stream="{stream}"}} 960.0'
                    in text)
            assert f'repwatch_scored_samples_total{{run="shmrun",stream="{stream}"}} 960.0' in text
        acc = sidecar.accounting()
        received = sum(acc["received"].values())
        assert received == sum(acc["scored"].values()) + sum(acc["dropped"].values()) == 1920
        runs = httpx.get(f"{server.url}/v1/runs", timeout=10).json()
        assert [r["run"] for r in runs] == ["shmrun"] and runs[0]["step"] == 30
    finally:
        reader.stop()
        server.stop()
        sidecar.close()


@pytest.mark.e2e
def test_serve_cli_creates_and_unlinks_the_ring(name: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "monitor.cli", "serve", "--port", "0",
                             "--backend", "torch", "--device", "cpu", "--shm", name],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait(lambda: (SHM / name).exists() or proc.poll() is not None, 30)
        assert proc.poll() is None, proc.communicate()[1]
        again = subprocess.run([sys.executable, "-m", "monitor.cli", "serve", "--port", "0",
                                "--shm", name], check=False, cwd=ROOT, capture_output=True,
                               text=True,
                               timeout=60)
        assert again.returncode == 2 and "already served by a live sidecar" in again.stderr
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert not (SHM / name).exists()
    assert "leaked" not in err, err


_HOLDER = textwrap.dedent("""
    import sys, time
    from monitor.transport.shm import ShmRing
    ring = ShmRing.attach(sys.argv[1])
    ring.claim_producer()
    print("claimed", flush=True)
    time.sleep(60)
""")


@pytest.mark.e2e
def test_one_producer_per_ring_and_a_killed_one_frees_it(name: str) -> None:
    """A second trainer on a ring in use is refused (its sink counts the rows as
    ``sidecar_down``); the claim dies with the process that held it."""
    ring = ShmRing.create(name, slots=4, slot_size=8192)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, name], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sink = None
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "claimed"
        other = ShmRing.attach(name)
        with pytest.raises(RingError, match="already has a producer"):
            other.claim_producer()
        other.close()
        sink = ShmSink(f"shm://{name}", run="r")
        sink.submit("s", torch.ones(5, 4), None, 0)
        assert _wait(lambda: sink.counts().get("sidecar_down", 0) == 5)
        assert ring.pending() == 0                       # nothing of the second trainer got in
        holder.kill()
        holder.wait(30)
        mine = ShmRing.attach(name)
        mine.claim_producer()                             # the killed trainer's claim is gone
        mine.close()
    finally:
        holder.kill()
        holder.wait(30)
        if sink is not None:
            sink.close(1)
        ring.close()

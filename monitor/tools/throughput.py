"""Sidecar ingest+score throughput against score-only throughput (``repwatch bench`` figure 5
and ``benchmarks/sidecar_throughput.py``), torch-free.

Score-only: the backend's ``ingest`` called directly on pre-built batches. Ingest+score: the same
batches POSTed by client *processes* (as trainers are) to a real uvicorn serving the sidecar app
on 127.0.0.1, until the service has scored them all (429s are retried, so every batch is scored
once), or written into the shared-memory ring of ``repwatch serve --shm`` by one producer. The
clock starts once every client process holds its data and is connected (a barrier), so moving
the test data into the clients is not timed. The CPU time this process (server + scorer; the
clients are other processes) spends per batch in each gives the share of the sidecar's CPU
that goes to scoring, which does not depend on how many cores the load generator leaves free.

Clients: ``sink`` (``monitor.transport.HttpSink``, what ``Monitor(sink=...)`` uses: the client
processes import torch; each keeps at most 16 batches in its sink's queue, and batches the sink
drops are reported as ``retries``); ``raw`` (pre-built HTTP/1.1 requests on a
keep-alive socket, a minimal load generator like wrk, so the clients take as little of the
machine as possible); ``shm`` (one producer process, waiting while the ring is full).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.server import BackgroundServer
from monitor.transport.wire import encode_batch
from monitor.sidecar.service import (BACKENDS, Sidecar, SidecarConfig, create_sidecar_app)


def make_batches(n: int, rows: int, dim: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [np.maximum(rng.standard_normal((rows, dim)), 0).astype(np.float32) for _ in range(n)]


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads: the server, the scorer), at nanosecond
    resolution (``os.times`` counts 10 ms ticks)."""
    return time.process_time()


def score_only(config: SidecarConfig, batches: list[np.ndarray]) -> tuple[float, float]:
    """(rows/s, CPU ms per batch) of the backend called directly."""
    backend = BACKENDS[config.backend](config)
    c0, t0 = cpu_seconds(), time.perf_counter()
    for i, rows in enumerate(batches, 1):
        backend.ingest("bench", "enc", rows, None, i)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    backend.close()
    return sum(b.shape[0] for b in batches) / seconds, 1e3 * cpu / len(batches)


def _through_sink(url: str, batches: list[tuple[int, np.ndarray]]) -> int:
    """Send ``(step, rows)`` through a real :class:`monitor.transport.HttpSink`, keeping its queue
    short (a trainer's sink is not handed 1000 batches at once); the batches it dropped."""
    import torch

    from monitor.transport import HttpSink

    sink = HttpSink(url, run="bench", queue_batches=64, timeout=30.0)
    try:
        for step, rows in batches:
            while sink.queued >= 16:              # ≥ 20 ms of scoring queued: no starving
                time.sleep(0.005)
            sink.submit("enc", torch.from_numpy(rows), None, step)
        if not sink.flush(600):
            raise RuntimeError("the sink did not drain in 600 s")
        return sum(sink.counts().values())
    finally:
        sink.close()


def _raw_request(host: str, port: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _read_status(sock: socket.socket, buf: bytes) -> tuple[int, bytes]:
    """Read one response (Content-Length framed); return its status and the bytes after it."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    length = next((int(v) for k, v in (ln.split(b":", 1) for ln in lines[1:])
                   if k.strip().lower() == b"content-length"), 0)
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(lines[0].split(b" ", 2)[1]), rest[length:]


def _send_raw(sock: socket.socket, requests: list[bytes]) -> int:
    retries, buf = 0, b""
    for request in requests:
        while True:
            sock.sendall(request)
            status, buf = _read_status(sock, buf)
            if status != 429:
                if status != 202:
                    raise RuntimeError(f"POST answered {status}")
                break
            retries += 1
            time.sleep(0.01)
    return retries


def _write_ring(ring: Any, bodies: list[tuple[dict[str, str], bytes]]) -> int:
    waits = 0
    for headers, body in bodies:
        while not ring.write("bench", "enc", headers, body):
            waits += 1
            time.sleep(0.0005)
    return waits


def _client_process(kind: str, target: Any, work: list[Any], cores: set[int] | None,
                    start: Any, results: Any) -> None:
    """One load-generator process: connect (``kind`` sink/raw: ``target`` the base URL or
    (host, port); shm: the ring's name), wait at ``start`` (a barrier with the parent, which
    starts its clock when everyone is there), send ``work``, put (retries or full-ring waits,
    CPU seconds spent sending) on ``results``. The data came with the process's arguments."""

    def timed(send: Any, *args: Any) -> None:
        start.wait()
        c0 = cpu_seconds()
        results.put((send(*args), cpu_seconds() - c0))

    pin(cores)
    try:
        if kind == "shm":
            from monitor.transport.shm import ShmRing

            ring = ShmRing.attach(target)
            ring.claim_producer()
            try:
                timed(_write_ring, ring, work)
            finally:
                ring.close()
        elif kind == "raw":
            with socket.create_connection(target, timeout=30) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                timed(_send_raw, sock, work)
        else:
            import monitor.transport.sinks  # noqa: F401 - torch's import is not the transport's time

            timed(_through_sink, target, work)
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        start.abort()
        results.put(exc)


def parse_cores(spec: str | None) -> set[int] | None:
    """'0,1' or '2-5' → a CPU set (None: no pinning)."""
    if not spec:
        return None
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out |= set(range(int(lo), int(hi or lo) + 1))
    return out


def pin(cores: set[int] | None) -> None:
    if cores:
        os.sched_setaffinity(0, cores)


@dataclass
class IngestResult:
    """What :func:`ingest_and_score` measured."""

    rows_per_second: float
    cpu_ms_per_batch: float
    body_bytes_per_second: float
    scored: int
    dropped: int
    retries: int
    client_cpu_ms_per_batch: float


def ingest_and_score(config: SidecarConfig, batches: list[np.ndarray], clients: int,
                     client: str = "sink", client_cores: set[int] | None = None
                     ) -> IngestResult:
    """Rows/s, CPU ms per batch of this process and request-body bytes/s through a real
    uvicorn on 127.0.0.1 (``client="shm"``: through the shared-memory ring)."""
    sidecar = Sidecar(config)
    server = BackgroundServer(create_sidecar_app(config, sidecar), "127.0.0.1", 0)
    server.start()
    path = "/v1/runs/bench/streams/enc/batches"
    bodies = [encode_batch(rows, step=i) for i, rows in enumerate(batches, 1)]
    reader = None
    if client == "shm":
        from monitor.transport.shm import ShmReader

        name = f"rwbench-{os.getpid()}"
        slot_mb = max(1, -(-len(bodies[0][1]) // (1 << 20)))
        reader = ShmReader(f"{name}?slots=64&slot_mb={slot_mb}", sidecar).start()
        clients, target, parts = 1, name, [bodies]
    elif client == "raw":
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        target = (host, int(port))
        requests = [_raw_request(host, int(port), path, h, b) for h, b in bodies]
        parts = [requests[k::clients] for k in range(clients)]
    else:
        numbered = list(enumerate(batches, 1))
        target, parts = server.url, [numbered[k::clients] for k in range(clients)]
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(clients + 1), ctx.Queue()
    procs = [ctx.Process(target=_client_process, args=(client, target, part, client_cores,
                                                       start, results), daemon=True)
             for part in parts]
    for p in procs:
        p.start()
    try:
        try:
            start.wait(timeout=300)               # every client connected, its data in hand
        except threading.BrokenBarrierError:
            outcomes = [results.get(timeout=30) for _ in procs if not results.empty()]
            raise RuntimeError(f"a load-generator process could not start: {outcomes!r}"
                               ) from None
        c0, t0 = cpu_seconds(), time.perf_counter()
        outcomes = [results.get(timeout=600) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    if failed:
        raise RuntimeError(f"a load-generator process failed: {failed[0]!r}") from failed[0]
    retries = sum(r for r, _ in outcomes)
    client_cpu = sum(c for _, c in outcomes)
    if reader is not None:
        while reader.ring is not None and reader.ring.pending():
            time.sleep(0.001)
    sidecar.wait_idle(600)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    if reader is not None:
        reader.stop()
    acc = sidecar.accounting()
    server.stop()
    sidecar.close()
    scored = sum(acc["scored"].values())
    dropped = sum(acc["dropped"].values())
    sent = sum(len(body) for _, body in bodies)
    return IngestResult(scored / seconds, 1e3 * cpu / len(batches), sent / seconds, scored,
                        dropped, retries, 1e3 * client_cpu / len(batches))

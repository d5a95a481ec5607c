"""Sidecar ingest+score throughput against score-only throughput, as a ratio (one machine, one run).

Score-only: the backend's ``ingest`` called directly on pre-built batches. Ingest+score: the same
batches POSTed by ``--clients`` concurrent HTTP client *processes* (as trainers are) to a real
uvicorn serving the sidecar app on 127.0.0.1, until the service has scored them all (429s are
retried, so every batch is scored once). Reports rows/s of both and the ratio (target ≥ 0.8),
and the CPU time the benchmark process (server + scorer; the clients are other processes) spent
per batch in each: their ratio is the share of the sidecar's CPU that goes to scoring, which
does not depend on how many cores the load generator leaves free.

``--client httpx`` posts with httpx (what ``Monitor(sink=...)`` uses); ``--client raw`` writes
pre-built HTTP/1.1 requests on a keep-alive socket (a minimal load generator, like wrk, so the
clients take as little of the machine's CPU as possible); ``--client shm`` writes the same
encoded batches into the shared-memory ring of ``repwatch serve --shm`` from one producer
process (one trainer per ring), waiting while the ring is full.

    .venv/bin/python benchmarks/sidecar_throughput.py --backend onnx --batches 400 --rows 256 --dim 128
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import socket
import time

import httpx
import numpy as np

from monitor.server import BackgroundServer
from monitor.sidecar.protocol import encode_batch
from monitor.sidecar.service import (BACKENDS, Sidecar, SidecarConfig, create_sidecar_app,
                                     limit_native_threads)


def _batches(n: int, rows: int, dim: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [np.maximum(rng.standard_normal((rows, dim)), 0).astype(np.float32) for _ in range(n)]


def _cpu() -> float:
    """CPU seconds of this process (all threads: the server, the scorer)."""
    t = os.times()
    return t.user + t.system


def score_only(config: SidecarConfig, batches: list[np.ndarray]) -> tuple[float, float]:
    """(rows/s, CPU ms per batch) of the backend called directly."""
    backend = BACKENDS[config.backend](config)
    c0, t0 = _cpu(), time.perf_counter()
    for i, rows in enumerate(batches, 1):
        backend.ingest("bench", "enc", rows, None, i)
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    backend.close()
    return sum(b.shape[0] for b in batches) / seconds, 1e3 * cpu / len(batches)


def _ping(url: str) -> None:
    httpx.get(f"{url}/healthz", timeout=30)


def _client(part: tuple[str, list[tuple[dict[str, str], bytes]]]) -> int:
    url, bodies = part
    retries = 0
    with httpx.Client(timeout=30) as http:
        for headers, body in bodies:
            while True:
                r = http.post(url, content=body, headers=headers)
                if r.status_code != 429:
                    r.raise_for_status()
                    break
                retries += 1
                time.sleep(0.01)
    return retries


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


def _raw_client(part: tuple[str, int, list[bytes]]) -> int:
    host, port, requests = part
    retries, buf = 0, b""
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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


def _shm_client(part: tuple[str, list[tuple[dict[str, str], bytes]]]) -> int:
    from monitor.shm import ShmRing

    name, bodies = part
    ring = ShmRing.attach(name)
    ring.claim_producer()
    waits = 0
    try:
        for headers, body in bodies:
            while not ring.write("bench", "enc", headers, body):
                waits += 1
                time.sleep(0.0005)
    finally:
        ring.close()
    return waits


def _cores(spec: str | None) -> set[int] | None:
    """'0,1' or '2-5' → a CPU set (None: no pinning)."""
    if not spec:
        return None
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out |= set(range(int(lo), int(hi or lo) + 1))
    return out


def _pin(cores: set[int] | None) -> None:
    if cores:
        os.sched_setaffinity(0, cores)


def ingest_and_score(config: SidecarConfig, batches: list[np.ndarray], clients: int,
                     client: str = "httpx", client_cores: set[int] | None = None
                     ) -> tuple[float, float]:
    """(rows/s, CPU ms per batch of this process) through a real uvicorn."""
    sidecar = Sidecar(config)
    server = BackgroundServer(create_sidecar_app(config, sidecar), "127.0.0.1", 0)
    server.start()
    path = "/v1/runs/bench/streams/enc/batches"
    bodies = [encode_batch(rows, step=i) for i, rows in enumerate(batches, 1)]
    reader = None
    if client == "shm":
        from monitor.shm import ShmReader

        name = f"rwbench-{os.getpid()}"
        slot_mb = max(1, -(-len(bodies[0][1]) // (1 << 20)))
        reader = ShmReader(f"{name}?slots=64&slot_mb={slot_mb}", sidecar).start()
        clients, work, parts = 1, _shm_client, [(name, bodies)]
    elif client == "raw":
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        requests = [_raw_request(host, int(port), path, h, b) for h, b in bodies]
        work, parts = _raw_client, [(host, int(port), requests[k::clients]) for k in range(clients)]
    else:
        work, parts = _client, [(server.url + path, bodies[k::clients]) for k in range(clients)]
    with mp.get_context("spawn").Pool(clients, initializer=_pin, initargs=(client_cores,)) as pool:
        pool.map(_ping, [server.url] * clients)                         # start-up off the clock
        c0, t0 = _cpu(), time.perf_counter()
        retries = sum(pool.map(work, parts))
    if reader is not None:
        while reader.ring is not None and reader.ring.pending():
            time.sleep(0.001)
    sidecar.wait_idle(600)
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    if reader is not None:
        reader.stop()
    acc = sidecar.accounting()
    server.stop()
    sidecar.close()
    scored = sum(acc["scored"].values())
    dropped = sum(acc["dropped"].values())
    print(f"  accounting: received {sum(acc['received'].values())} = scored {scored} + dropped "
          f"{dropped} (overload answers retried / full-ring waits: {retries})")
    return scored / seconds, 1e3 * cpu / len(batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="onnx", choices=sorted(BACKENDS))
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--client", choices=("httpx", "raw", "shm"), default="httpx")
    p.add_argument("--admit-wait", type=float, default=0.25,
                   help="seconds a POST waits for room in a full queue (the service default)")
    p.add_argument("--server-cores", default=None, metavar="LIST",
                   help="pin this process (server + scorer, and score-only) to these CPUs, "
                        "e.g. 0,1 (a sidecar's share of a node)")
    p.add_argument("--client-cores", default=None, metavar="LIST",
                   help="pin the client processes to these CPUs, e.g. 2-5 (the trainer's)")
    args = p.parse_args()
    _pin(_cores(args.server_cores))
    config = SidecarConfig(backend=args.backend, device="cpu", every=args.every, window=4096,
                           queue_batches=64, admit_wait_seconds=args.admit_wait)
    limit_native_threads(config.threads)                             # as `repwatch serve` does
    batches = _batches(args.batches, args.rows, args.dim)
    score_only(config, batches[:20])                                   # warm-up
    base, base_cpu = score_only(config, batches)
    full, full_cpu = ingest_and_score(config, batches, args.clients, args.client,
                                      _cores(args.client_cores))
    print(f"{platform.machine()} CPU ({os.cpu_count()} cores), backend {args.backend}, "
          f"{args.batches} batches of {args.rows}×{args.dim} float32, "
          f"{1 if args.client == 'shm' else args.clients} {args.client} client process(es), "
          f"publish every {args.every}, admit wait {args.admit_wait} s, server cores "
          f"{args.server_cores or 'any'}, client cores {args.client_cores or 'any'}")
    print(f"score-only {base:,.0f} rows/s   ingest+score {full:,.0f} rows/s   "
          f"ratio {full / base:.2f}")
    print(f"CPU per batch: score-only {base_cpu:.2f} ms   sidecar (HTTP + scoring) "
          f"{full_cpu:.2f} ms   scoring share {base_cpu / full_cpu:.2f}")


if __name__ == "__main__":
    main()

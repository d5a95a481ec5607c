"""Sidecar ingest+score throughput against score-only throughput, as a ratio (one machine, one run).

Score-only: the backend's ``ingest`` called directly on pre-built batches. Ingest+score: the same
batches POSTed by ``--clients`` concurrent HTTP client *processes* (as trainers are) to a real
uvicorn serving the sidecar app on 127.0.0.1, until the service has scored them all (429s are
retried, so every batch is scored once). Reports rows/s of both and the ratio (target ≥ 0.8).

    .venv/bin/python benchmarks/sidecar_throughput.py --backend onnx --batches 400 --rows 256 --dim 128
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import time

import httpx
import numpy as np

from monitor.server import BackgroundServer
from monitor.sidecar.protocol import encode_batch
from monitor.sidecar.service import BACKENDS, Sidecar, SidecarConfig, create_sidecar_app


def _batches(n: int, rows: int, dim: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [np.maximum(rng.standard_normal((rows, dim)), 0).astype(np.float32) for _ in range(n)]


def score_only(config: SidecarConfig, batches: list[np.ndarray]) -> float:
    backend = BACKENDS[config.backend](config)
    t0 = time.perf_counter()
    for i, rows in enumerate(batches, 1):
        backend.ingest("bench", "enc", rows, None, i)
    seconds = time.perf_counter() - t0
    backend.close()
    return sum(b.shape[0] for b in batches) / seconds


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


def ingest_and_score(config: SidecarConfig, batches: list[np.ndarray], clients: int) -> float:
    sidecar = Sidecar(config)
    server = BackgroundServer(create_sidecar_app(config, sidecar), "127.0.0.1", 0)
    server.start()
    url = f"{server.url}/v1/runs/bench/streams/enc/batches"
    bodies = [encode_batch(rows, step=i) for i, rows in enumerate(batches, 1)]
    parts = [(url, bodies[k::clients]) for k in range(clients)]
    with mp.get_context("spawn").Pool(clients) as pool:
        pool.map(_ping, [server.url] * clients)                         # start-up off the clock
        t0 = time.perf_counter()
        retries = sum(pool.map(_client, parts))
    sidecar.wait_idle(600)
    seconds = time.perf_counter() - t0
    acc = sidecar.accounting()
    server.stop()
    sidecar.close()
    scored = sum(acc["scored"].values())
    dropped = sum(acc["dropped"].values())
    print(f"  accounting: received {sum(acc['received'].values())} = scored {scored} + dropped "
          f"{dropped} (overload answers retried: {retries})")
    return scored / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="onnx", choices=sorted(BACKENDS))
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--every", type=int, default=50)
    args = p.parse_args()
    config = SidecarConfig(backend=args.backend, device="cpu", every=args.every, window=4096,
                           queue_batches=64)
    batches = _batches(args.batches, args.rows, args.dim)
    score_only(config, batches[:20])                                   # warm-up
    base = score_only(config, batches)
    full = ingest_and_score(config, batches, args.clients)
    print(f"{platform.machine()} CPU, backend {args.backend}, {args.batches} batches of "
          f"{args.rows}×{args.dim} float32, {args.clients} clients, publish every {args.every}")
    print(f"score-only {base:,.0f} rows/s   ingest+score {full:,.0f} rows/s   "
          f"ratio {full / base:.2f}")


if __name__ == "__main__":
    main()

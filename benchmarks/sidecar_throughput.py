"""Sidecar ingest+score throughput against score-only throughput, as a ratio (one machine, one
run); the measurement is :mod:`monitor.tools.throughput` (also ``repwatch bench`` figure 5).

    .venv/bin/python benchmarks/sidecar_throughput.py --backend onnx --batches 400 --rows 256 --dim 128

``--transport-only``: the sidecar scores nothing (a backend that drops every batch), so the
figures are the transport's alone: batches/s and the sidecar's CPU ms per batch.
"""

from __future__ import annotations

import argparse
import os
import platform
from typing import Any

from monitor.sidecar.config import BACKEND_NAMES
from monitor.sidecar.service import BACKENDS, SidecarConfig, limit_native_threads
from monitor.tools.throughput import (ingest_and_score, make_batches, parse_cores, pin,
                                        score_only)


class NoScoring:
    """A backend that accepts every batch and does nothing (``--transport-only``)."""

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config

    def ingest(self, run: str, stream: str, rows: Any, labels: Any, step: int | None) -> None:
        return None

    def snapshots(self) -> list[Any]:
        return []

    def history(self, run: str) -> None:
        return None

    def close(self) -> None:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="onnx", choices=sorted(BACKENDS))
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--client", choices=("sink", "raw", "shm"), default="sink")
    p.add_argument("--admit-wait", type=float, default=0.25,
                   help="seconds a POST waits for room in a full queue (the service default)")
    p.add_argument("--server-cores", default=None, metavar="LIST",
                   help="pin this process (server + scorer, and score-only) to these CPUs, "
                        "e.g. 0,1 (a sidecar's share of a node)")
    p.add_argument("--client-cores", default=None, metavar="LIST",
                   help="pin the client processes to these CPUs, e.g. 2-5 (the trainer's)")
    p.add_argument("--transport-only", action="store_true",
                   help="score nothing: batches/s and CPU per batch of the transport alone")
    args = p.parse_args()
    pin(parse_cores(args.server_cores))
    if args.transport_only:
        BACKENDS["none"] = NoScoring
        BACKEND_NAMES.append("none")
        args.backend = "none"
    config = SidecarConfig(backend=args.backend, device="cpu", every=args.every, window=4096,
                           queue_batches=64, admit_wait_seconds=args.admit_wait)
    limit_native_threads(config.threads)                             # as `repwatch serve` does
    batches = make_batches(args.batches, args.rows, args.dim)
    if args.transport_only:
        res = ingest_and_score(config, batches, args.clients, args.client,
                               parse_cores(args.client_cores))
        print(f"transport only, {args.client} ({1 if args.client == 'shm' else args.clients} "
              f"client process(es)), {args.batches} batches of {args.rows}×{args.dim} float32: "
              f"{res.rows_per_second / args.rows:,.0f} batches/s, sidecar "
              f"{res.cpu_ms_per_batch:.3f} CPU ms per batch, load generator "
              f"{res.client_cpu_ms_per_batch:.3f}; accounting: scored {res.scored} + dropped "
              f"{res.dropped}")
        return
    score_only(config, batches[:20])                                   # warm-up
    base, base_cpu = score_only(config, batches)
    res = ingest_and_score(config, batches, args.clients, args.client,
                           parse_cores(args.client_cores))
    full, full_cpu = res.rows_per_second, res.cpu_ms_per_batch
    print(f"  accounting: scored {res.scored} + dropped {res.dropped} (overload answers retried "
          f"/ full-ring waits: {res.retries}); {res.body_bytes_per_second / 2**20:,.1f} MiB/s "
          f"of request bodies")
    print(f"{platform.machine()} CPU ({os.cpu_count()} cores), backend {args.backend}, "
          f"{args.batches} batches of {args.rows}×{args.dim} float32, "
          f"{1 if args.client == 'shm' else args.clients} {args.client} client process(es), "
          f"publish every {args.every}, admit wait {args.admit_wait} s, server cores "
          f"{args.server_cores or 'any'}, client cores {args.client_cores or 'any'}")
    print(f"score-only {base:,.0f} rows/s   ingest+score {full:,.0f} rows/s   "
          f"ratio {full / base:.2f}")
    print(f"CPU per batch: score-only {base_cpu:.2f} ms   sidecar (HTTP + scoring) "
          f"{full_cpu:.2f} ms   scoring share {base_cpu / full_cpu:.2f}   load generator "
          f"{res.client_cpu_ms_per_batch:.2f} ms")


if __name__ == "__main__":
    main()

"""Peak resident memory of a real ``repwatch serve`` process, against its memory budget.

Starts the sidecar (``--backend onnx`` by default) on a free loopback port, reads its peak RSS
(``VmHWM`` of ``/proc/PID/status``) once it is ready (the process's own cost: interpreter,
numpy, ONNX Runtime, FastAPI, uvicorn), then posts streams of growing dimension one after the
other (``--batches`` batches of ``--rows`` rows each, stepping so that every stream is
published) and reads the peak again after each. Prints, per stream, the growth of the peak and
the backend's estimate (``stream_bytes(d)``, what admission charges), and the baseline from
which the default ``--memory-budget-mb`` is set (docs/operations.md "Limits and failure
modes").

    python benchmarks/sidecar_memory.py                    # d = 768 2048 4096 8192
    python benchmarks/sidecar_memory.py --dims 256 16384 --backend torch
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

from monitor.sidecar.config import SidecarConfig
from monitor.transport.wire import encode_batch

_MIB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peak(pid: int) -> int:
    """Peak resident bytes (``VmHWM``) of process ``pid``."""
    with open(f"/proc/{pid}/status") as fh:
        m = re.search(r"^VmHWM:\s+(\d+) kB", fh.read(), re.M)
    assert m is not None
    return int(m.group(1)) * 1024


def _estimates(backend: str, dims: list[int]) -> dict[int, int]:
    """``stream_bytes(d)`` of a fresh backend of the same kind, in this process."""
    from monitor.sidecar.service import BACKENDS

    be = BACKENDS[backend](SidecarConfig(backend=backend))
    try:
        return {d: int(be.stream_bytes(d)) for d in dims}       # type: ignore[attr-defined]
    finally:
        be.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("onnx", "torch"), default="onnx")
    p.add_argument("--dims", type=int, nargs="+", default=[768, 2048, 4096, 8192])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--batches", type=int, default=12)
    args = p.parse_args(argv)
    port = _free_port()
    cmd = [sys.executable, "-m", "monitor.cli", "serve", "--backend", args.backend,
           "--port", str(port), "--device", "cpu", "--memory-budget-mb", str(1 << 20)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the sidecar did not start: {proc.stderr.read()!r}")
                time.sleep(0.2)
            base = _peak(proc.pid)
            estimates = _estimates(args.backend, args.dims)
            print(f"repwatch serve --backend {args.backend}: peak RSS when ready "
                  f"{base / _MIB:.0f} MiB")
            print(f"{'d':>6} {'peak MiB':>9} {'growth MiB':>11} {'estimate MiB':>13} "
                  f"{'growth/estimate':>16}")
            before = base
            rng = np.random.default_rng(0)
            for i, d in enumerate(args.dims):
                for step in range(args.batches):
                    rows = rng.standard_normal((args.rows, d)).astype(np.float32)
                    headers, body = encode_batch(rows, step=i * 1000 + step)
                    r = client.post(f"/v1/runs/mem/streams/d{d}/batches", headers=headers,
                                    content=body)
                    if r.status_code != 202:
                        raise SystemExit(f"d={d}: {r.status_code} {r.text}")
                while client.get("/v1/runs").json() == [] or _queued(client):
                    time.sleep(0.1)
                peak = _peak(proc.pid)
                est = estimates[d]
                print(f"{d:>6} {peak / _MIB:>9.0f} {(peak - before) / _MIB:>11.0f} "
                      f"{est / _MIB:>13.0f} {(peak - before) / est:>16.2f}")
                before = peak
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


def _queued(client: httpx.Client) -> bool:
    """Whether batches still wait or are being scored (from /metrics)."""
    text = client.get("/metrics").text
    return any(float(v) > 0 for v in re.findall(r"^repwatch_sidecar_queued_samples\S* (\S+)$",
                                                text, re.M))


if __name__ == "__main__":
    raise SystemExit(main())

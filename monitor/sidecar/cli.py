"""``repwatch serve``: run the sidecar service (wired into ``monitor.cli`` by ``add_parser``)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import stat
import sys
import threading
from typing import Any

from monitor.cli.argtypes import positive_int
from monitor.engine.run import DEFAULT_MAX_STEP_JUMP
from monitor.sidecar.config import DEFAULT_MEMORY_BUDGET_MB
from monitor.validation import is_loopback

log = logging.getLogger("repwatch.sidecar")


_positive = positive_int


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0–65535, got {value}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` command to ``subparsers`` (of ``argparse``)."""
    p = subparsers.add_parser(
        "serve", help="run the sidecar: ingest embedding batches over HTTP, serve /metrics",
        description="Sidecar mode: trainers post sampled embedding batches "
                    "(POST /v1/runs/{run}/streams/{stream}/batches); the service scores them "
                    "and serves /metrics, /v1/runs and the live dashboard at /.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback; any other needs --token-file)")
    p.add_argument("--port", type=_port, default=9400, help="port (default 9400; 0: any free)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="file holding the bearer token every write must carry")
    p.add_argument("--backend", choices=("auto", "onnx", "torch"), default="auto",
                   help="scoring backend: onnx (ONNX Runtime kernels, no torch; spectral, "
                        "collapse, Q-Score), torch (every signal, labels included); auto "
                        "(default): onnx when onnxruntime is installed, else torch")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--every", type=_positive, default=10,
                   help="publish every N training steps per run (default 10)")
    p.add_argument("--window", type=_positive, default=8192,
                   help="rows in each stream's scoring window (default 8192)")
    p.add_argument("--history", type=_positive, default=512,
                   help="snapshots kept per run for /v1/runs/{run}/history (default 512)")
    p.add_argument("--max-body-mb", type=float, default=64.0,
                   help="largest request body in MiB (default 64; 413 beyond)")
    p.add_argument("--max-rows-per-batch", type=_positive, default=65536,
                   help="rows per batch (default 65536; 400 beyond)")
    p.add_argument("--max-dim", type=_positive, default=16384,
                   help="dimensions per row (default 16384; 400 beyond)")
    p.add_argument("--max-streams-per-run", type=_positive, default=64,
                   help="streams per run (default 64; 409 beyond)")
    p.add_argument("--max-runs", type=_positive, default=64,
                   help="runs per service (default 64; 409 beyond)")
    p.add_argument("--queue-batches", type=_positive, default=64,
                   help="batches waiting for the scorer (default 64; 429 beyond)")
    p.add_argument("--admit-wait", type=float, default=0.25, metavar="SECONDS",
                   help="how long a POST waits for room in a full queue before 429 (default "
                        "0.25; 0: answer 429 at once)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="time a POST has to send its whole body (default 30; 408 beyond)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="time a connection has to send a complete request head, from its "
                        "opening or from the previous answer (default 10; closed beyond)")
    p.add_argument("--keep-alive", type=float, default=5.0, metavar="SECONDS",
                   help="an idle kept-alive connection is closed after this long (default 5)")
    p.add_argument("--max-connections", type=_positive, default=128,
                   help="open connections at most (default 128; more are closed at once and "
                        "requests beyond answer 503); bodies being read take at most this "
                        "many times --max-body-mb")
    p.add_argument("--workers", type=_positive, default=2,
                   help="scoring threads (default 2): runs are scored in parallel, each run's "
                        "batches in order")
    p.add_argument("--queue-batches-per-run", type=_positive, default=None, metavar="N",
                   help="places of the scoring queue one run may hold (default: half of "
                        "--queue-batches), so a slow run leaves room for the others")
    p.add_argument("--memory-budget-mb", type=float, default=DEFAULT_MEMORY_BUDGET_MB,
                   metavar="MIB",
                   help=f"bytes the scoring state and queued batches may take (default "
                        f"{DEFAULT_MEMORY_BUDGET_MB:g}: fits a 1 GiB container); a new stream "
                        "beyond it answers 409")
    p.add_argument("--spectral-path", choices=("auto", "exact", "sketch"), default=None,
                   help="a stream's window state (default auto: a Gaussian sketch above "
                        "--sketch-above dimensions; APPROXIMATE, docs/performance.md)")
    p.add_argument("--sketch-above", type=_positive, default=None, metavar="D",
                   help="dimension above which auto sketches (default 4096)")
    p.add_argument("--sketch-dim", type=_positive, default=None, metavar="K",
                   help="the sketch's dimension k (default 2048)")
    p.add_argument("--max-step-jump", type=_positive, default=DEFAULT_MAX_STEP_JUMP,
                   metavar="STEPS",
                   help="largest forward jump of a run's step between two batches (default "
                        f"{DEFAULT_MAX_STEP_JUMP}); larger ones are counted, not applied")
    p.add_argument("--threads", type=_positive, default=1,
                   help="CPU threads of the ONNX Runtime scorer (default 1: a sidecar shares "
                        "the pod's cores with training)")
    p.add_argument("--io-binding", choices=("auto", "on", "off"), default="auto",
                   help="ONNX backend: keep the window sums on the device with I/O binding "
                        "(auto: with the CUDA execution provider)")
    p.add_argument("--shm", default=None, metavar="NAME",
                   help="also read batches from the shared-memory ring NAME (created here, "
                        "unlinked on exit) for trainers on this host with sink='shm://NAME'; "
                        "NAME?slots=64&slot_mb=4 sets its geometry (defaults shown)")
    p.set_defaults(func=run)
    return p


def read_token(path: str) -> str:
    """The token in ``path`` (whitespace stripped); ValueError when unreadable or empty. Warns
    on stderr (as ssh does for a key) when any user of the machine may access it (a mode bit
    for others): a warning, not a refusal, because mounted secrets are often 0644 or 0444
    (Kubernetes' default ``defaultMode``, Compose secrets); group access (0640 with a pod's
    ``fsGroup``) is the usual way to share a secret with a non-root container."""
    try:
        with open(path, encoding="utf-8") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            token = fh.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read token file {path!r}: {exc}") from None
    if not token:
        raise ValueError(f"token file {path!r} is empty; put the bearer token in it")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError(f"token in {path!r} must be one word of printable characters")
    if os.name == "posix" and mode & 0o007:
        print(f"repwatch: warning: token file {path!r} is accessible by every user "
              f"(mode {stat.S_IMODE(mode):04o}); restrict it: chmod 600 {shlex.quote(path)}",
              file=sys.stderr)
    return token


def _fail(message: str) -> int:
    print(f"repwatch serve: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Run the service until interrupted; 2 on a configuration error, 1 when it cannot bind."""
    from monitor.sidecar.service import SidecarConfig

    token = None
    if args.token_file is not None:
        try:
            token = read_token(args.token_file)
        except ValueError as exc:
            return _fail(str(exc))
    if token is None and not is_loopback(args.host):
        return _fail(f"refusing to serve on non-loopback address {args.host!r} without a token: "
                     "pass --token-file FILE (every write then needs 'Authorization: Bearer "
                     "<token>'), or bind 127.0.0.1")
    shm = getattr(args, "shm", None)
    if shm is not None:
        from monitor.transport.shm import parse_spec

        try:
            parse_spec(shm)
        except ValueError as exc:
            return _fail(f"--shm: {exc}")
    if not 0 < args.max_body_mb <= 4096:
        return _fail(f"--max-body-mb must be in (0, 4096], got {args.max_body_mb}")
    try:
        config = SidecarConfig(
            host=args.host, port=args.port, token=token, backend=args.backend,
            device=args.device, every=args.every, window=args.window, history=args.history,
            max_body_bytes=int(args.max_body_mb * (1 << 20)),
            max_rows_per_batch=args.max_rows_per_batch, max_dim=args.max_dim,
            max_streams_per_run=args.max_streams_per_run, max_runs=args.max_runs,
            queue_batches=args.queue_batches, admit_wait_seconds=args.admit_wait,
            body_timeout_seconds=args.body_timeout, header_timeout_seconds=args.header_timeout,
            keep_alive_seconds=args.keep_alive, max_connections=args.max_connections,
            threads=args.threads, workers=args.workers,
            queue_batches_per_run=args.queue_batches_per_run,
            memory_budget_mb=args.memory_budget_mb, max_step_jump=args.max_step_jump,
            monitor_options={key: value for key, value in (
                ("spectral_path", args.spectral_path), ("sketch_above", args.sketch_above),
                ("sketch_dim", args.sketch_dim)) if value is not None},
            io_binding={"auto": None, "on": True, "off": False}[args.io_binding])
    except ValueError as exc:
        return _fail(str(exc))
    return serve(config) if shm is None else serve(config, shm=shm)


class _Terminated(Exception):
    """SIGTERM arrived (raised by :func:`_terminated` so that cleanup runs)."""


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def serve(config: Any, shm: str | None = None) -> int:
    """Serve ``config`` (a :class:`SidecarConfig`) with uvicorn in this thread until stopped;
    with ``shm`` (``NAME[?slots=N&slot_mb=M]``) also read the shared-memory ring ``NAME``."""
    import uvicorn

    from monitor.server.app import server_config
    from monitor.sidecar.service import Sidecar, create_sidecar_app, limit_native_threads

    limit_native_threads(config.threads)
    try:
        sidecar = Sidecar(config)
    except ValueError as exc:                       # e.g. --device cuda without CUDA
        return _fail(str(exc))
    reader = None
    if shm is not None:                   # --- shared-memory ring (monitor/transport/shm.py)
        from monitor.transport.shm import ShmReader

        try:
            reader = ShmReader(shm, sidecar).start()
        except (OSError, ValueError) as exc:       # a live sidecar has it, /dev/shm full, ...
            sidecar.close()
            return _fail(f"--shm: {exc}")
        print(f"repwatch sidecar reading shared-memory ring {reader.spec.name!r} "
              f"({reader.ring.slots} slots of {reader.ring.slot_size} bytes); trainers use "
              f"sink='shm://{reader.spec.name}'", file=sys.stderr)
    app = create_sidecar_app(config, sidecar)
    server = uvicorn.Server(server_config(
        app, config.host, config.port, log_level="info",
        header_timeout=config.header_timeout_seconds, keep_alive=config.keep_alive_seconds,
        max_connections=config.max_connections))
    print(f"repwatch sidecar on http://{config.host}:{config.port}/ (backend {config.backend}, "
          f"device {getattr(sidecar.backend, 'device', config.device)}, "
          f"token {'required' if config.token else 'off'})", file=sys.stderr)
    # uvicorn re-raises a captured SIGTERM after its graceful shutdown; with the default handler
    # that kills the process before the `finally` below (the shm ring would stay in /dev/shm)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        server.run()
    except _Terminated:
        pass
    except SystemExit as exc:                       # uvicorn exits this way when it cannot bind
        print(f"repwatch serve: cannot serve on {config.host}:{config.port} ({exc!r})",
              file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if reader is not None:
            reader.stop()                           # closes the ring, drains it, unlinks it
        sidecar.close()
    return 0 if server.started else 1

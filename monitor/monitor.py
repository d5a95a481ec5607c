"""Monitor: owns the captures, the engine, the alerts and the server; ``step()`` / ``publish()``."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from monitor.alerts import DEFAULT_RULES, AlertEngine, AlertRule
from monitor.capture import TOKEN_MODES, Capture, Tokens, subsample, to_rows
from monitor.engine import Engine
from monitor.errors import ErrorLog
from monitor.snapshot import Alert, Snapshot

log = logging.getLogger("repwatch")

_NAME = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")


def _check_name(kind: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{kind} must be 1–128 characters of letters, digits and _.:/-, "
                         f"got {value!r}")
    return value


def _check_int(kind: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{kind} must be an int >= {low}, got {value!r}")
    return value


class Monitor:
    """Watches representations of a live training run and publishes their health.

    >>> mon = Monitor(run="exp1", every=10, max_rows=256, window=8192, port=None)
    >>> mon.watch(model.encoder, name="encoder")   # doctest: +SKIP
    >>> mon.observe("projector", z)                # doctest: +SKIP
    >>> mon.step()                                 # once per optimizer step  # doctest: +SKIP

    Args:
        run: run label on every metric.
        every: publish every ``every`` calls of :meth:`step`.
        max_rows: at most this many rows per captured batch (uniform subsample, own RNG).
        window: rows in each stream's sliding scoring window.
        port: HTTP port for ``/metrics`` and the status page (0: any free port; None: no server).
            Only local rank 0 (``LOCAL_RANK``) serves.
        host: address to bind (loopback by default).
        tokens: default reduction of ``(b, T, d)`` token outputs: ``"mean"``, ``"cls"``, ``"all"``.
        seed: seed of the monitor's own sampling generator.
        rules: alert rules (default :data:`monitor.alerts.DEFAULT_RULES`).
        history: snapshots kept in memory for ``/v1/runs/{run}/history``.
        log_path: optional JSONL file, one snapshot per publish.
        alpha_centered: fit α-ReQ on the centred spectrum (a second eigendecomposition).
        strict: re-raise errors inside repwatch instead of only counting them (debugging).
        peak_warmup: steps before the peak effective rank starts being tracked. A freshly
            initialised network's effective rank is high and falls as training starts; that
            fall is learning, not collapse, so it must not set the peak that
            ``RepwatchDimensionalCollapse`` compares against.
    """

    def __init__(self, run: str = "default", every: int = 10, max_rows: int = 256,
                 window: int = 8192, port: int | None = 9400, host: str = "127.0.0.1", *,
                 tokens: Tokens = "mean", seed: int = 0,
                 rules: Sequence[AlertRule] = DEFAULT_RULES, history: int = 512,
                 log_path: str | os.PathLike[str] | None = None, alpha_centered: bool = False,
                 strict: bool = False, peak_warmup: int = 100) -> None:
        self.run = _check_name("run", run)
        self.every = _check_int("every", every, 1)
        self.max_rows = _check_int("max_rows", max_rows, 1)
        self.window = _check_int("window", window, 2)
        if self.max_rows > self.window:
            raise ValueError(f"max_rows ({max_rows}) must not exceed window ({window})")
        if port is not None:
            _check_int("port", port, 0)
            if port > 65535:
                raise ValueError(f"port must be 0–65535 or None, got {port}")
        if tokens not in TOKEN_MODES:
            raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {tokens!r}")
        _check_int("seed", seed, 0)
        _check_int("history", history, 1)
        if not all(isinstance(r, AlertRule) for r in rules):
            raise TypeError("rules must be a sequence of monitor.alerts.AlertRule")
        self.tokens: Tokens = tokens
        self.seed = seed
        self.strict = strict
        self.rules = tuple(rules)
        self._errors = ErrorLog()
        self.peak_warmup = _check_int("peak_warmup", peak_warmup, 0)
        self._engine = Engine(self.window, self._errors, {"alpha_centered": alpha_centered},
                              peak_warmup=self.peak_warmup)
        self._alerts = AlertEngine(self.rules, run=self.run)
        self._captures: list[Capture] = []
        self._callbacks: list[Callable[[Alert], Any]] = []
        self._generators: dict[torch.device, torch.Generator] = {}
        self._step = 0
        self._lock = threading.RLock()
        self._latest: Snapshot | None = None
        self._history: deque[Snapshot] = deque(maxlen=history)
        self._log_path = Path(log_path) if log_path is not None else None
        self._server: Any = None
        self._closed = False
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if port is not None and local_rank == 0:
            from monitor.server import BackgroundServer, create_app

            app = create_app(lambda: self._latest, lambda: list(self._history), self.rules)
            self._server = BackgroundServer(app, host, port)
            self._server.start()
            log.info("repwatch serving on %s", self._server.url)

    # ------------------------------------------------------------------ capture

    def watch(self, module: nn.Module, name: str | None = None, *,
              select: Callable[[Any], Tensor] | None = None,
              tokens: Tokens | None = None) -> Capture:
        """Score the output of ``module`` (a forward hook) as stream ``name``.

        ``select(output) -> Tensor`` picks the tensor from a structured output (default: the
        first floating-point tensor); ``tokens`` overrides the monitor's token reduction.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"watch() needs a torch.nn.Module, got {type(module).__name__}")
        if name is None:
            name = type(module).__name__.lower()
            taken = {c.stream for c in self._captures}
            base, i = name, 1
            while name in taken:
                i += 1
                name = f"{base}{i}"
        _check_name("stream name", name)
        capture = Capture(self, name, module, select, tokens or self.tokens)
        self._captures.append(capture)
        return capture

    def observe(self, name: str, tensor: Tensor, *, tokens: Tokens | None = None) -> None:
        """Score ``tensor`` (rows, tokens or conv maps) as a batch of stream ``name``."""
        try:
            _check_name("stream name", name)
            mode = tokens or self.tokens
            if mode not in TOKEN_MODES:
                raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {mode!r}")
            with torch.no_grad():
                self._ingest(name, tensor.detach() if isinstance(tensor, Tensor) else tensor, mode)
        except Exception as exc:
            self._errors.record("observe", exc, key=f"observe[{name}]")
            if self.strict:
                raise

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    def _ingest(self, name: str, tensor: Any, tokens: Tokens) -> None:
        rows = to_rows(tensor, tokens)                                   # (b, d)
        if rows.shape[0] == 0 or rows.shape[1] == 0:
            return
        rows = subsample(rows, self.max_rows, self._generator(rows.device))
        with self._lock:
            self._engine.update(name, rows)

    # ------------------------------------------------------------------ publish

    @property
    def step_count(self) -> int:
        """Optimizer steps counted by :meth:`step`."""
        return self._step

    def step(self, steps: int = 1) -> Snapshot | None:
        """Count optimizer steps; publishes (and returns the Snapshot) on the cadence."""
        before = self._step
        self._step += steps
        if self._step // self.every > before // self.every:
            return self.publish()
        return None

    def publish(self) -> Snapshot:
        """Compute every stream now (one host sync), evaluate alerts, notify, export."""
        t0 = time.perf_counter()
        with self._lock:
            try:
                result = self._engine.compute(step=self._step)
            except Exception as exc:
                self._errors.record("publish", exc)
                if self.strict:
                    raise
                from monitor.engine import EngineResult
                result = EngineResult()
            try:
                firing, fired, resolved = self._alerts.evaluate(result.streams, self._step)
            except Exception as exc:
                self._errors.record("alerts", exc)
                if self.strict:
                    raise
                firing, fired, resolved = self._alerts.firing(), [], []
            snap = Snapshot(run=self.run, step=self._step, time=time.time(),
                            streams=result.streams, counters=result.counters,
                            spectra=result.spectra, alerts=firing,
                            errors=self._errors.counts(),
                            publish_duration_seconds=time.perf_counter() - t0)
            self._latest = snap
            self._history.append(snap)
        for alert in fired:
            log.warning("ALERT %s [%s] firing on %s/%s at step %d: %s", alert.name,
                        alert.severity, self.run, alert.stream, self._step, alert.description)
            for callback in list(self._callbacks):
                try:
                    callback(alert)
                except Exception as exc:
                    self._errors.record("callback", exc, key=f"callback[{getattr(callback, '__name__', callback)}]")
                    if self.strict:
                        raise
        for alert in resolved:
            log.warning("RESOLVED %s on %s/%s at step %d", alert.name, self.run, alert.stream,
                        self._step)
        if self._log_path is not None:
            try:
                with self._log_path.open("a") as fh:
                    fh.write(json.dumps(snap.to_dict()) + "\n")
            except Exception as exc:
                self._errors.record("log", exc)
        return snap

    @property
    def latest(self) -> Snapshot | None:
        """The latest Snapshot (None before the first publish)."""
        return self._latest

    @property
    def history(self) -> list[Snapshot]:
        """Recent snapshots, oldest first (bounded)."""
        return list(self._history)

    def on_alert(self, callback: Callable[[Alert], Any]) -> Callable[[Alert], Any]:
        """Call ``callback(alert)`` whenever an alert starts firing (usable as a decorator).

        Exceptions in the callback are caught and counted; to stop training from a callback,
        set a flag that the training loop reads.
        """
        if not callable(callback):
            raise TypeError(f"on_alert needs a callable, got {type(callback).__name__}")
        self._callbacks.append(callback)
        return callback

    @property
    def url(self) -> str | None:
        """Base URL of the HTTP server (None without one)."""
        return self._server.url if self._server is not None else None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step, windows, peaks, alert states, RNG, errors."""
        with self._lock:
            return {
                "version": 1, "run": self.run, "step": self._step,
                "engine": self._engine.state_dict(),
                "alerts": self._alerts.state_dict(),
                "errors": self._errors.counts(),
                "generators": {str(d): g.get_state() for d, g in self._generators.items()},
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (streams on CUDA load on the CPU when CUDA is absent)."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("not a repwatch Monitor state_dict (version 1)")

        def device_map(name: str) -> torch.device:
            dev = torch.device(name)
            return dev if dev.type != "cuda" or torch.cuda.is_available() else torch.device("cpu")

        with self._lock:
            self._step = int(state["step"])
            self._engine.load_state_dict(state["engine"], device_map)
            self._alerts.load_state_dict(state["alerts"])
            self._errors.load(state.get("errors", {}))
            self._generators.clear()
            for name, gstate in state.get("generators", {}).items():
                dev = device_map(name)
                if dev.type == torch.device(name).type:
                    self._generator(dev).set_state(gstate)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Remove hooks and stop the server. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for capture in self._captures:
            capture.remove()
        if self._server is not None:
            self._server.stop()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"Monitor(run={self.run!r}, every={self.every}, max_rows={self.max_rows}, "
                f"window={self.window}, streams={sorted(self._engine.streams)}, url={self.url!r})")


"""Monitor: the facade a training loop talks to — capture, step, publish, checkpoint.

It wires the parts together and owns none of their logic: :class:`~monitor.config.MonitorConfig`
(options), :mod:`monitor.capture` (hooks → rows), :mod:`monitor.engine.paths` (rows scored here
or shipped to a sidecar), :class:`~monitor.engine.Engine` (windows and scorers),
:class:`~monitor.engine.run.RunPublisher` (snapshot, alerts, history),
:mod:`monitor.engine.overhead`, :mod:`monitor.engine.side_streams` and :mod:`monitor.server`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from monitor.capture import (
    ACTIVATION_TYPES,
    ActivationCapture,
    Capture,
    CaptureTarget,
    Generators,
    default_stream_name,
    find_activations,
    prepare_batch,
    unit_rows,
)
from monitor.config import TOKEN_MODES, MonitorConfig, Tokens
from monitor.engine import Engine
from monitor.engine.memory import available_device, device_tensors
from monitor.engine.overhead import OverheadBudget
from monitor.engine.paths import LocalScoring, SinkScoring
from monitor.engine.run import RunPublisher, publish_due
from monitor.engine.side_streams import SideStreams
from monitor.errors import ErrorLog
from monitor.snapshot import Alert, Readings, Snapshot
from monitor.validation import check_int, check_name

log = logging.getLogger("repwatch")


class Monitor:
    """Watches representations of a live training run and publishes their health.

    >>> mon = Monitor(run="exp1", every=10, max_rows=256, window=8192, port=None)
    >>> mon.watch(model.encoder, name="encoder")   # doctest: +SKIP
    >>> mon.observe("projector", z)                # doctest: +SKIP
    >>> mon.step()                                 # once per optimizer step  # doctest: +SKIP

    Every option is a field of :class:`~monitor.config.MonitorConfig` (documented there), given
    as a keyword, and readable as an attribute (``mon.window``); ``mon.config`` holds them all.
    """

    def __init__(self, run: str = "default", every: int = 10, max_rows: int = 256,
                 window: int = 8192, port: int | None | Literal["auto"] = "auto",
                 host: str = "127.0.0.1",
                 **options: Any) -> None:
        self.config = cfg = MonitorConfig(run, every, max_rows, window, port, host, **options)
        self._closed = True                     # until the constructor is through
        self._errors = ErrorLog(strict=cfg.strict)
        self._overhead = OverheadBudget(cfg.overhead_budget)
        self._capturing = True      # is the coming step captured (overhead budget's stretch)
        self._calls = 0             # step() calls (the capture stride counts calls, not steps)
        self._engine = Engine.from_config(cfg, self._errors)
        self._publisher = RunPublisher(cfg.run, cfg.rules, self._engine.tracker, self._errors,
                                       cfg.history, cfg.nc1_depth_threshold, cfg.log_path)
        self._captures: list[Capture] = []
        self._target = CaptureTarget(
            take=lambda stream, t, tokens: self._ingest(stream, t, tokens, from_hook=True),
            stage=self._stage, take_activations=self._ingest_activations,
            capturing=lambda: self._capturing, errors=self._errors, spent=self._overhead.add)
        self._generator = Generators(cfg.seed)
        self._side = SideStreams(cfg.cuda_stream)
        self._staged: dict[str, Tensor] = {}     # CUDA-graph-captured hooks' static buffers
        self._step = 0
        self._lock = threading.RLock()
        self._server: Any = None
        from monitor.engine.distributed import GlobalReducer, serving_port

        self._reducer = GlobalReducer(self._errors)
        self.sink: Any = None
        if cfg.sink is not None:
            from monitor.transport import make_sink

            self.sink = make_sink(cfg.sink, token=cfg.token, run=cfg.run)
            self._path: LocalScoring | SinkScoring = SinkScoring(self.sink, self._engine,
                                                                 self._errors)
        else:
            self._path = LocalScoring(self._engine, self._errors, self._lock, self._side,
                                      None if cfg.per_rank else self._reducer)
        self._closed = False
        port = serving_port(cfg.port, cfg.per_rank)
        if port is not None:
            from monitor.server import SingleRunSource, serve_run

            source = SingleRunSource(lambda: self._publisher.latest,
                                     lambda: list(self._publisher.history), cfg.rules)
            with self._errors.guard("server"):       # a taken port must not stop training
                self._server = serve_run(source, cfg.host, port)

    def __getattr__(self, name: str) -> Any:
        """The options as attributes: ``mon.window`` is ``mon.config.window``."""
        config = self.__dict__.get("config")
        if config is not None and name in MonitorConfig.__dataclass_fields__:
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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
            name = default_stream_name(module, {c.stream for c in self._captures})
        check_name("stream name", name)
        capture = Capture(self._target, name, module, select, tokens or self.config.tokens)
        self._captures.append(capture)
        return capture

    def observe(self, name: str, tensor: Tensor, *, tokens: Tokens | None = None,
                labels: Tensor | None = None, predictions: Tensor | None = None) -> None:
        """Score ``tensor`` (rows, tokens or conv maps) as a batch of stream ``name``.

        ``labels`` (class ids, one per sample) feed neural collapse; with ``predictions`` (a
        classifier's predicted ids) too, the stream also reports the AUPRC of "low Q-Score →
        misclassified" (an evaluation stream).
        """
        if not self._capturing:      # a step the overhead budget skips
            return
        t0 = time.perf_counter()
        try:
            check_name("stream name", name)
            mode = tokens or self.config.tokens
            if mode not in TOKEN_MODES:
                raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {mode!r}")
            with self._errors.guard("observe", key=f"observe[{name}]"), torch.no_grad():
                self._ingest(name, tensor.detach() if isinstance(tensor, Tensor) else tensor, mode,
                             labels=labels, predictions=predictions)
        finally:
            self._overhead.add(time.perf_counter() - t0)

    def watch_activations(self, model: nn.Module, names: Sequence[str] | None = None, *,
                          types: tuple[type[nn.Module], ...] = ACTIVATION_TYPES
                          ) -> list[ActivationCapture]:
        """Track plasticity of ``model``'s activation layers (Lyle; Sokar; Dohare): every module
        of ``types`` (ReLU, GELU, SiLU, ...) or the modules ``names``
        (:func:`~monitor.capture.find_activations`). Per layer: τ-dormant, low-activity and
        never-active fractions, effective rank and srank. A module used at several places of
        the forward pass is one layer."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"watch_activations() needs a torch.nn.Module, got {type(model).__name__}")
        found = find_activations(model, names, types)
        captures = []
        for n, module in found:
            check_name("layer name", n)
            cap = ActivationCapture(self._target, n, module)
            self._captures.append(cap)
            captures.append(cap)
        return captures

    def watch_classifier(self, linear: nn.Linear, stream: str | None = None) -> None:
        """Use ``linear`` (class weights W, bias b) for NC3 and NC4 on ``stream`` (default:
        every labelled stream whose dimension equals ``linear.in_features``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"watch_classifier() needs a torch.nn.Linear, got {type(linear).__name__}")
        self._engine.watch_classifier(linear, stream)

    def pair(self, fake: str, real: str, *, reservoir: int = 512,
             dup_quantile: float = 0.01) -> None:
        """Compare generated stream ``fake`` with real stream ``real`` (GAN mode collapse):
        diversity ratio, birthday-paradox duplicate rate and effective-rank ratio."""
        with self._lock:
            self._engine.pair(fake, real, reservoir=reservoir, dup_quantile=dup_quantile,
                              seed=self.config.seed)

    def sample_scores(self, stream: str) -> tuple[Tensor, Tensor]:
        """Q-Scores of the last batch of ``stream`` and the rows' indices in that batch (for
        data triage: low scores are the samples the representation serves worst). Host sync."""
        self._side.join()
        with self._lock:
            return self._engine.sample_scores(stream)

    def watch_weights(self, model: nn.Module, *, rank_every: int = 10, update_ratio: bool = True,
                      earlybird: Sequence[float] | None = (0.5, 0.8, 0.9)) -> None:
        """Per parameter at publish: norms, gradient norm, update-to-weight ratio; every
        ``rank_every`` publishes rank and stable rank (Galanti et al.) and the early-bird mask
        distance at the ``earlybird`` sparsities (You et al. 2020). See
        :class:`monitor.probes.weights.WeightWatch`."""
        from monitor.probes.weights import WeightWatch

        if not isinstance(model, nn.Module):
            raise TypeError(f"watch_weights() needs a torch.nn.Module, got {type(model).__name__}")
        self._weights = WeightWatch(model, rank_every=check_int("rank_every", rank_every, 1),
                                    update_ratio=update_ratio, earlybird=earlybird)
        self._engine.param_sources.append(self._weights.param_signals)
        self._engine.run_sources.append(self._weights.run_signals)

    def watch_curvature(self, params: Any, *, every: int = 100, power_iters: int = 20,
                        refresh_every: int | None = None) -> None:
        """Turn on the curvature probe (docs/metrics.md §7a, §10): every ``every`` steps
        :meth:`probe_curvature` publishes ``hessian_top_eigenvalue`` and the sampled
        ``sgd_lyapunov_exponent`` (:class:`monitor.probes.curvature.CurvatureProbe`; syncs the
        device at its cadence)."""
        from monitor.probes.curvature import CurvatureProbe

        self._curvature = CurvatureProbe(params, every=check_int("every", every, 1),
                                         power_iters=check_int("power_iters", power_iters, 1),
                                         refresh_every=refresh_every, seed=self.seed)
        self._engine.run_sources.append(self._curvature.compute)

    def probe_curvature(self, loss_fn: Callable[[], Tensor], lr: float,
                        weight_decay: float = 0.0) -> None:
        """Call once per step, before ``step()``, with a closure that recomputes this
        minibatch's loss (evaluate it in eval mode to leave BatchNorm statistics and the global
        RNG untouched). Does nothing between sampled steps or without :meth:`watch_curvature`."""
        probe = getattr(self, "_curvature", None)
        if probe is None:
            return
        t0 = time.perf_counter()
        try:
            with self._errors.guard("curvature"):
                probe.maybe_probe(self._step + 1, loss_fn, lr, weight_decay)
        finally:
            self._overhead.add(time.perf_counter() - t0)

    def _ingest(self, name: str, tensor: Any, tokens: Tokens, labels: Tensor | None = None,
                predictions: Tensor | None = None, from_hook: bool = False) -> None:
        batch = prepare_batch(tensor, tokens, self.config.max_rows, self._generator, labels,
                              predictions)
        if batch is not None:        # hook rows of whole samples wait for step(labels=)
            defer = from_hook and not (tensor.dim() == 3 and tokens == "all")
            self._path.take(name, batch, tensor, defer, self._step)

    def _stage(self, name: str, rows: Tensor) -> None:
        """A hook inside CUDA-graph capture: the graph copies the rows into its own buffer;
        :meth:`step` scores the buffer after each replay."""
        with self._lock:
            self._staged[name] = rows.detach().clone()

    def _ingest_activations(self, name: str, h: Tensor) -> None:
        rows = unit_rows(h, self.config.max_rows, self._generator)      # (n, units) or None
        if rows is not None:
            with self._lock:
                self._engine.update_layer(name, h, rows)

    # ------------------------------------------------------------------ publish

    @property
    def step_count(self) -> int:
        """Optimizer steps counted by :meth:`step`."""
        return self._step

    @property
    def errors(self) -> ErrorLog:
        """The exceptions caught inside repwatch, counted by component (``snap.errors``)."""
        return self._errors

    @property
    def strict(self) -> bool:
        """Re-raise errors inside repwatch instead of only counting them (debugging)."""
        return self._errors.strict

    def step(self, steps: int = 1, *, labels: Tensor | None = None) -> Snapshot | None:
        """Count optimizer steps; publishes (and returns the Snapshot) on the cadence.

        ``labels``: the class ids of this step's batch; they join the rows that the watched
        modules (``watch``) captured since the last ``step()`` (neural collapse per stream;
        rows given to ``observe`` take their own ``labels=``). Under a stretched cadence
        (``overhead_budget``) publishes come every ``every·k`` steps.
        """
        t0 = time.perf_counter()
        self._overhead.tick(t0)
        if self._staged and self._capturing:
            for name, buf in list(self._staged.items()):
                with self._errors.guard("capture", key=f"capture[{name}]"), torch.no_grad():
                    self._ingest(name, buf, "mean", from_hook=True)
        self._path.end_step(labels, self._step)
        before = self._step
        self._step += steps
        snap = None
        self._overhead.add(time.perf_counter() - t0)
        if publish_due(before, self._step, self.config.every * self._overhead.stretch):
            snap = self.publish()                     # times itself
        self._calls += 1
        self._capturing = self._overhead.captures(self._calls + 1)
        return snap

    @property
    def effective_cadence(self) -> int:
        """Current stretch k of the overhead budget: every k-th step is captured (1: all)."""
        return self._overhead.stretch

    def publish(self) -> Snapshot:
        """Compute every stream now (one host sync), evaluate alerts, notify, export."""
        t0 = time.perf_counter()
        with self._lock, self._side.scoring_all():   # publish behind the queued updates
            result = Readings()
            with self._errors.guard("publish"):
                result = self._path.compute(self._step)
            self._engine.after_publish()
            from monitor.engine.distributed import ranks_publish_together

            # under a global reduction every rank publishes at the same steps: no stretching
            alone = self.config.per_rank or self.sink is not None or not ranks_publish_together()
            ratio, stretch = self._overhead.close_window(alone)
            rank = None
            if self.config.per_rank:
                from monitor.engine.distributed import global_rank

                rank = global_rank()
            snap, fired, resolved = self._publisher.publish(
                result, self._step, t0, order=self._path.order, overhead_ratio=ratio,
                effective_cadence_steps=float(stretch), rank=rank,
                **self._path.snapshot_fields())
        self._side.join()
        self._publisher.notify(snap, fired, resolved)
        self._overhead.add(time.perf_counter() - t0)
        return snap

    @property
    def latest(self) -> Snapshot | None:
        """The latest Snapshot (None before the first publish)."""
        return self._publisher.latest

    @property
    def history(self) -> list[Snapshot]:
        """Recent snapshots, oldest first."""
        return list(self._publisher.history)

    def on_alert(self, callback: Callable[[Alert], Any]) -> Callable[[Alert], Any]:
        """Call ``callback(alert)`` whenever an alert fires (usable as a decorator).

        Exceptions in the callback are caught and counted; to stop training from a callback,
        set a flag that the training loop reads.
        """
        if not callable(callback):
            raise TypeError(f"on_alert needs a callable, got {type(callback).__name__}")
        self._publisher.callbacks.append(callback)
        return callback

    @property
    def url(self) -> str | None:
        """Base URL of the HTTP server (None without one)."""
        return self._server.url if self._server is not None else None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step, windows, peaks, alert states, RNG, errors."""
        self._side.join()
        with self._lock:
            return {
                "version": 1, "run": self.config.run, "step": self._step,
                "engine": self._engine.state_dict(),
                "alerts": self._publisher.alerts.state_dict(),
                "errors": self._errors.counts(),
                "generators": self._generator.state_dict(),
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (streams on CUDA load on the CPU when CUDA is absent).
        All or nothing: a checkpoint that fails to load leaves the monitor as it was."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("not a repwatch Monitor state_dict (version 1)")
        with self._lock:
            previous = self.state_dict()
            try:
                self._apply(state)
            except BaseException:
                self._apply(previous)
                raise

    def _apply(self, state: dict[str, Any]) -> None:
        self._side.join()
        self._engine.load_state_dict(state["engine"], available_device)
        for stream in self._engine.streams.values():   # now read on the side stream
            self._side.hand(stream.device, device_tensors(stream))
        self._publisher.alerts.load_state_dict(state["alerts"])
        self._errors.load(state.get("errors", {}))
        self._generator.load_state_dict(state.get("generators", {}), available_device)
        step, latest = int(state["step"]), self._publisher.latest
        if latest is not None and step < latest.step:    # resumed from an earlier checkpoint
            self._publisher.rewind(step, self._step)
        self._step = step

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Remove hooks, stop the server and the sink. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for capture in self._captures:
            capture.remove()
        if self._server is not None:
            self._server.stop()
        self._path.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return (f"Monitor(run={self.config.run!r}, every={self.config.every}, "
                f"max_rows={self.config.max_rows}, window={self.config.window}, "
                f"streams={sorted(self._engine.streams)}, url={self.url!r})")

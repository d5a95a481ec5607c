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
from monitor.capture.observe import ObserveBook, Pause, RowCap
from monitor.capture.rows import Batch
from monitor.config import CAPTURE_MODES, TOKEN_MODES, CaptureMode, MonitorConfig, Tokens
from monitor.engine import Engine
from monitor.engine.checkpoint import Checkpointing
from monitor.engine.overhead import OverheadBudget
from monitor.engine.paths import LocalScoring, SinkScoring
from monitor.engine.run import RunPublisher, publish_due
from monitor.engine.side_streams import SideStreams
from monitor.errors import ErrorLog
from monitor.probes.methods import ModelProbes
from monitor.snapshot import Alert, Readings, Snapshot
from monitor.validation import check_name

log = logging.getLogger("repwatch")


class Monitor(ModelProbes, Checkpointing):
    """Watches representations of a live training run and publishes their health.

    >>> mon = Monitor(run="exp1", every=10, max_rows=256, window=8192, port=None)
    >>> mon.watch(model.encoder, name="encoder")   # doctest: +SKIP
    >>> mon.observe("projector", z)                # doctest: +SKIP
    >>> mon.step()                                 # once per optimizer step  # doctest: +SKIP

    Every option is a field of :class:`~monitor.config.MonitorConfig` (documented there), given
    as a keyword, and readable as an attribute (``mon.window``); ``mon.config`` holds them all.

    Hooks capture only while the watched module is in training mode (``capture="train"``), so
    a validation pass under ``model.eval()`` stays out of the training windows;
    ``with mon.paused():`` stops all capture for a block. :meth:`close` (or leaving a ``with``
    block) publishes the steps counted since the last publish.
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
        self._pause = Pause()       # open paused() blocks (any thread)
        self._book = ObserveBook(cfg.max_rows, cfg.window)
        self._published_step = 0    # step of the latest publish (close() publishes what follows)
        self._calls = 0             # step() calls (the capture stride counts calls, not steps)
        self._engine = Engine.from_config(cfg, self._errors)
        self._publisher = RunPublisher(cfg.run, cfg.rules, self._engine.tracker, self._errors,
                                       cfg.history, cfg.nc1_depth_threshold, cfg.log_path)
        self._captures: list[Capture] = []
        self._target = CaptureTarget(
            take=lambda stream, t, tokens: self._ingest(stream, t, tokens, from_hook=True),
            stage=self._stage, take_activations=self._ingest_activations,
            capturing=lambda: self._capturing and not self._pause, errors=self._errors,
            spent=self._overhead.add)
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
                                                                 self._errors, self._publisher)
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
              tokens: Tokens | None = None, capture: CaptureMode | None = None) -> Capture:
        """Score the output of ``module`` (a forward hook) as stream ``name``.

        ``select(output) -> Tensor`` picks the tensor from a structured output (default: the
        first floating-point tensor); ``tokens`` overrides the monitor's token reduction.
        ``capture`` overrides the monitor's capture mode for this stream: ``"train"`` (only
        while ``module.training``: a validation pass under ``model.eval()`` is not captured),
        ``"always"``, or ``"eval"`` (only in eval mode: a stream of validation features).
        ``torch.no_grad()`` alone does not stop capture; :meth:`paused` does. The rows of
        every forward pass since the last :meth:`step` get that step's ``labels=``.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"watch() needs a torch.nn.Module, got {type(module).__name__}")
        if name is None:
            name = default_stream_name(module, {c.stream for c in self._captures})
        check_name("stream name", name)
        capture = Capture(self._target, name, module, select, tokens or self.config.tokens,
                          self._capture_mode(capture))
        self._captures.append(capture)
        return capture

    def _capture_mode(self, capture: CaptureMode | None) -> CaptureMode:
        mode = self.config.capture if capture is None else capture
        if mode not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {mode!r}")
        return mode

    def paused(self) -> contextlib.AbstractContextManager[None]:
        """Stop all capture inside the block (hooks and :meth:`observe`); nestable and
        monitor-wide (every thread); steps still count: ``with mon.paused(): evaluate(model)``."""
        return self._pause.block()

    def observe(self, name: str, tensor: Tensor, *, tokens: Tokens | None = None,
                labels: Tensor | None = None, predictions: Tensor | None = None,
                max_rows: RowCap = "auto") -> None:
        """Score ``tensor`` (rows, tokens or conv maps) as a batch of stream ``name``.

        ``labels`` (class ids, one per sample) feed neural collapse: an ``observe()`` stream
        gets neural-collapse signals only from its own ``labels=`` (``step(labels=)`` labels
        the rows of ``watch()`` streams only, and says so once per unlabelled observe stream).
        With ``predictions`` (a classifier's predicted ids) too, the stream also reports the
        AUPRC of "low Q-Score → misclassified" (an evaluation stream).

        ``max_rows``: ``"auto"`` (default) keeps at most the monitor's ``max_rows`` rows of a
        training batch but every row of an evaluation batch (with ``predictions=``); an int
        caps the rows, None keeps them all. At most ``window`` rows of one batch are scored:
        beyond, a batch is subsampled and a warning says so once per stream. Rows subsampled
        away are counted in :attr:`subsampled_rows`. Not captured inside :meth:`paused`.
        """
        if not self._capturing or self._pause:    # a skipped step (overhead budget), a pause
            return
        t0 = time.perf_counter()
        try:
            check_name("stream name", name)
            mode = tokens or self.config.tokens
            if mode not in TOKEN_MODES:
                raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {mode!r}")
            cap = self._book.cap(max_rows, predictions is not None)
            self._book.observed(name, labels is not None)
            with self._errors.guard("observe", key=f"observe[{name}]"), torch.no_grad():
                batch = self._ingest(name, tensor.detach() if isinstance(tensor, Tensor)
                                     else tensor, mode, labels=labels, predictions=predictions,
                                     max_rows=cap)
                if batch is not None:
                    self._book.count(name, batch, cap)
        finally:
            self._overhead.add(time.perf_counter() - t0)

    @property
    def subsampled_rows(self) -> dict[str, int]:
        """Rows that :meth:`observe` subsampled away (``max_rows``, or a batch larger than the
        window), by stream; streams that lost none are absent. Hooks' subsampling to
        ``max_rows`` is not counted (it is the monitor's cost cap)."""
        return self._book.subsampled

    def watch_activations(self, model: nn.Module, names: Sequence[str] | None = None, *,
                          types: tuple[type[nn.Module], ...] = ACTIVATION_TYPES,
                          capture: CaptureMode | None = None) -> list[ActivationCapture]:
        """Track plasticity of ``model``'s activation layers (Lyle; Sokar; Dohare): every module
        of ``types`` (ReLU, GELU, SiLU, ...) or the modules ``names``
        (:func:`~monitor.capture.find_activations`). Per layer: τ-dormant, low-activity and
        never-active fractions, effective rank and srank. A module used at several places of
        the forward pass is one layer. ``capture``: as for :meth:`watch` (default: the
        monitor's, ``"train"``: eval-mode passes are not counted)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"watch_activations() needs a torch.nn.Module, got {type(model).__name__}")
        mode = self._capture_mode(capture)
        found = find_activations(model, names, types)
        captures = []
        for n, module in found:
            check_name("layer name", n)
            cap = ActivationCapture(self._target, n, module, mode=mode)
            self._captures.append(cap)
            captures.append(cap)
        return captures

    def watch_classifier(self, linear: nn.Linear, stream: str | None = None) -> None:
        """Use ``linear`` (class weights W, bias b) for NC3 and NC4 on ``stream`` (default:
        every labelled stream whose dimension equals ``linear.in_features``).

        Class c is ``linear``'s row c. Unless ``max_classes`` was given, the neural-collapse
        label capacity becomes ``linear.out_features`` (the largest, with several
        classifiers): larger labels are counted as out of range. A classifier that does not
        fit a stream (another ``in_features``) costs only that stream's NC3/NC4, counted
        under ``neural_collapse``; its other signals go on."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"watch_classifier() needs a torch.nn.Linear, got {type(linear).__name__}")
        with self._lock, self._side.scoring_all():    # may resize NC scorers' state
            self._engine.watch_classifier(linear, stream)

    def _ingest(self, name: str, tensor: Any, tokens: Tokens, labels: Tensor | None = None,
                predictions: Tensor | None = None, from_hook: bool = False,
                max_rows: int | None = None) -> Batch | None:
        batch = prepare_batch(tensor, tokens, max_rows or self.config.max_rows, self._generator,
                              labels, predictions)
        if batch is not None:        # hook rows of whole samples wait for step(labels=)
            defer = from_hook and not (tensor.dim() == 3 and tokens == "all")
            self._path.take(name, batch, tensor, defer, self._step)
        return batch

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
        modules (``watch``) captured since the last ``step()`` (neural collapse per stream).
        They do not label ``observe()`` rows, which take their own ``labels=``: an observe
        stream without them gets no neural-collapse signals (logged once per stream). Under a
        stretched cadence (``overhead_budget``) publishes come every ``every·k`` steps.
        """
        t0 = time.perf_counter()
        self._overhead.tick(t0)
        self._book.step(labels is not None)
        if self._staged and self._capturing and not self._pause:
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
            self._published_step = self._step
        self._side.join()
        if isinstance(self._path, SinkScoring):   # the sidecar's values and alerts read back
            snap = self._path.merge(snap)
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

    def on_publish(self, callback: Callable[[Snapshot], Any]) -> Callable[[Snapshot], Any]:
        """Call ``callback(snapshot)`` after every publish (e.g. a :mod:`monitor.loggers` sink;
        usable as a decorator); its exceptions are caught and counted."""
        if not callable(callback):
            raise TypeError(f"on_publish needs a callable, got {type(callback).__name__}")
        self._publisher.publish_callbacks.append(callback)
        return callback

    @property
    def url(self) -> str | None:
        """Base URL of the HTTP server (None without one)."""
        return self._server.url if self._server is not None else None

    # ------------------------------------------------------------------ lifecycle

    def close(self, *, publish: bool = True) -> None:
        """Publish the steps counted since the last publish (so that ``latest.step`` equals
        :attr:`step_count`: the last ``step_count % every`` steps of a run are not lost), then
        remove hooks, stop the server and the sink. Idempotent; leaving a ``with`` block closes.
        The Lightning and Hugging Face callbacks close at the end of training.

        ``publish=False`` skips that last publish. Under ``torch.distributed`` (global
        reduction) the last publish is collective: every rank must close together, so close
        after a failure that only this rank saw with ``publish=False`` (a ``with`` block left
        by an exception does so there)."""
        self._close(final_publish=publish)

    def _close(self, final_publish: bool) -> None:
        if self._closed:
            return
        try:
            if final_publish and self._step > self._published_step:
                with self._errors.guard("publish", key="publish[close]"):
                    self.publish()
        finally:
            self._closed = True
            for capture in self._captures:
                capture.remove()
            if self._server is not None:
                self._server.stop()
                self._server = None                       # url is None once closed
            self._path.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        from monitor.engine.distributed import ranks_publish_together

        collective = not self.config.per_rank and self.sink is None and ranks_publish_together()
        self.close(publish=kind is None or not collective)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._close(final_publish=False)     # garbage: nobody reads a last publish

    def __repr__(self) -> str:
        return (f"Monitor(run={self.config.run!r}, every={self.config.every}, "
                f"max_rows={self.config.max_rows}, window={self.config.window}, "
                f"streams={sorted(self._engine.streams)}, url={self.url!r})")

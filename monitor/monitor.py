"""Monitor: owns the captures, the engine, the alerts and the server; ``step()`` / ``publish()``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from monitor.alerts import DEFAULT_RULES, AlertRule
from monitor.capture import (
    ACTIVATION_TYPES,
    TOKEN_MODES,
    ActivationCapture,
    Capture,
    CaptureTarget,
    Tokens,
    subsample,
    to_rows,
)
from monitor.engine import Engine, EngineResult
from monitor.run import RunPublisher, publish_due
from monitor.errors import ErrorLog
from monitor.overhead import OverheadBudget
from monitor.scorers.sketch import SpectralPath
from monitor.snapshot import Alert, Snapshot
from monitor.validation import check_int, check_name

log = logging.getLogger("repwatch")

def _aligned(kind: str, values: Tensor | None, b: int) -> Tensor | None:
    """``values`` as a 1-D integer tensor of one entry per sample, or a clear error."""
    if values is None:
        return None
    if not isinstance(values, Tensor):
        raise TypeError(f"{kind} must be a torch.Tensor of class ids, got {type(values).__name__}")
    if values.dim() == 2 and values.is_floating_point():
        values = values.argmax(dim=1)                      # logits/probabilities → ids
    if values.dim() != 1 or values.shape[0] != b:
        raise ValueError(f"{kind} must hold one class id per sample: expected shape ({b},), "
                         f"got {tuple(values.shape)}")
    if values.is_floating_point():
        raise TypeError(f"{kind} must be integer class ids, got dtype {values.dtype}")
    return values.detach()


def _shares_memory(a: Tensor, b: Any) -> bool:
    """Whether ``a`` is (a view of) ``b``'s storage: host pointers only, no device sync."""
    return isinstance(b, Tensor) and a.untyped_storage().data_ptr() == \
        b.untyped_storage().data_ptr()


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
        port: HTTP port for ``/metrics`` and the dashboard at ``/`` (0: any free port; None: no server).
            Only local rank 0 (``LOCAL_RANK``, else ``rank % LOCAL_WORLD_SIZE``) serves.
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
        qscore: score every stream's rows with Q-Score (Kalibhat et al.; cheap, per-sample), or a
            dict of :class:`monitor.scorers.qscore.QScoreScorer` options, or False.
        dormant_taus: τ levels of the dormant-unit fractions of watched activation layers.
        max_classes: label capacity of the neural-collapse statistics (labels ≥ it are
            counted as out of range and skipped).
        nc1_depth_threshold: NC1 level that defines the "effective depth" (first watched stream,
            in watch order, whose NC1 is below it).
        sink: sidecar mode (:mod:`monitor.sink`): the URL of a ``repwatch serve`` sidecar
            (``"http://127.0.0.1:9400"``) or a sink object. Captured rows (after subsampling,
            with their labels) are shipped from a background thread instead of being scored
            here; the metrics live on the sidecar, and :meth:`publish` returns only local state
            (errors; the sink's dropped rows by reason are in ``mon.sink.counts()``).
            Activation layers and weights (``watch_activations``, ``watch_weights``) and
            ``predictions=`` are not shipped and stay local.
        token: bearer token of the sidecar (with a URL ``sink``).
        per_rank: under ``torch.distributed``, publish each rank's own values (no reduction)
            with a ``rank`` label, every rank serving on ``port + local rank``. By default
            (False) every publish reduces the scorers' sufficient statistics across ranks
            (:mod:`monitor.distributed`): every rank's Snapshot holds the exact global values
            and only local rank 0 serves.
        overhead_budget: keep repwatch's own host time per step under this fraction of the
            training step's (``0.01``: 1%). repwatch times its hooks, ``observe``, ``step()``
            and publishes with host timers (no GPU synchronisation: on a GPU its hot path only
            enqueues work, so host time is what it costs the training loop's thread; its GPU
            kernel time overlaps or queues and is not counted) against the wall time between
            ``step()`` calls. Over budget, the cadence stretches (:mod:`monitor.overhead`):
            only every k-th step is captured (hooks and ``observe`` return at once on the
            others) and publishes come every ``every·k`` steps; k doubles while over budget,
            halves once well under, within 1–64. None (default): measure only. Exported as
            ``repwatch_overhead_ratio`` and ``repwatch_effective_cadence_steps``. Under
            torch.distributed with global reduction (not ``per_rank``) ranks must publish
            together, so the cadence is not adapted there (the ratio is still measured).
        spectral_path: window state of a stream (and of a watched activation layer):
            ``"exact"`` (float64 d×d second moment), ``"sketch"`` (a seeded Gaussian projection
            to ``sketch_dim`` dimensions, :mod:`monitor.scorers.sketch`; APPROXIMATE, validated
            on synthetic spectra only, errors in docs/performance.md "Large d") or ``"auto"``
            (sketch when d > ``sketch_above`` or when the exact state, 8·d² + 4·window·d bytes,
            would exceed ``memory_limit_bytes``). A dict maps stream/layer names to a mode
            (key ``"*"``: the mode of the others). A sketch is used only when d > sketch_dim;
            ``repwatch_spectral_sketch_dim`` says which path a stream is on (0: exact).
            In-process only: the sidecar (``repwatch serve``) always scores exactly.
        sketch_above: dimension above which ``"auto"`` sketches.
        sketch_dim: k, the sketch's dimension.
        memory_limit_bytes: per-stream limit on the exact state for ``"auto"`` (None: none).
        cuda_stream: on a GPU, score streams on a side CUDA stream of repwatch's own
            (:meth:`_scoring`): the training stream only records an event and goes on; the
            window update, Q-Score and neural-collapse sums queue on the side stream behind it,
            and each publish runs there after waiting for the training stream. What must see
            the captured tensor as it was (the token/spatial reduction, the subsample, a copy
            of rows that are a view of the module's output) stays on the training stream, so a
            later in-place op on the output cannot change what is scored. Activation layers
            (``watch_activations``: per-unit sums over the whole activation tensor, which a
            copy would double) are reduced on the training stream.
    """

    def __init__(self, run: str = "default", every: int = 10, max_rows: int = 256,
                 window: int = 8192, port: int | None = 9400, host: str = "127.0.0.1", *,
                 tokens: Tokens = "mean", seed: int = 0,
                 rules: Sequence[AlertRule] = DEFAULT_RULES, history: int = 512,
                 log_path: str | os.PathLike[str] | None = None, alpha_centered: bool = False,
                 strict: bool = False, peak_warmup: int = 100,
                 qscore: bool | dict[str, Any] = True,
                 dormant_taus: Sequence[float] = (0.0, 0.025, 0.1), max_classes: int = 1000,
                 nc1_depth_threshold: float = 0.1, sink: Any = None,
                 token: str | None = None, per_rank: bool = False,
                 overhead_budget: float | None = None,
                 spectral_path: str | Mapping[str, str] = "auto", sketch_above: int = 4096,
                 sketch_dim: int = 2048, memory_limit_bytes: int | None = None,
                 cuda_stream: bool = True) -> None:
        self.run = check_name("run", run)
        self.every = check_int("every", every, 1)
        self.max_rows = check_int("max_rows", max_rows, 1)
        self.window = check_int("window", window, 2)
        if self.max_rows > self.window:
            raise ValueError(f"max_rows ({max_rows}) must not exceed window ({window})")
        if port is not None:
            check_int("port", port, 0)
            if port > 65535:
                raise ValueError(f"port must be 0–65535 or None, got {port}")
        if tokens not in TOKEN_MODES:
            raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {tokens!r}")
        check_int("seed", seed, 0)
        check_int("history", history, 1)
        if not all(isinstance(r, AlertRule) for r in rules):
            raise TypeError("rules must be a sequence of monitor.alerts.AlertRule")
        self.tokens: Tokens = tokens
        self.seed = seed
        self.rules = tuple(rules)
        self._errors = ErrorLog(strict=bool(strict))
        self._overhead = OverheadBudget(overhead_budget)
        self._capturing = True      # is the coming step captured (overhead budget's stretch)
        self._calls = 0             # step() calls (the capture stride counts calls, not steps)
        self._adapt_warned = False
        self.peak_warmup = check_int("peak_warmup", peak_warmup, 0)
        if not isinstance(qscore, (bool, dict)):
            raise TypeError(f"qscore must be True, False or a dict of options, got {qscore!r}")
        taus = tuple(float(t) for t in dormant_taus)
        if not taus or any(not 0.0 <= t < 1.0 for t in taus):
            raise ValueError(f"dormant_taus must be levels in [0, 1), got {dormant_taus!r}")
        paths = dict(spectral_path) if isinstance(spectral_path, Mapping) else {"*": spectral_path}
        spectral = SpectralPath(paths.pop("*", "auto"), sketch_above=sketch_above,  # type: ignore[arg-type]
                                sketch_dim=sketch_dim, memory_limit_bytes=memory_limit_bytes,
                                seed=seed, streams=paths)  # type: ignore[arg-type]
        self._engine = Engine(self.window, self._errors, {"alpha_centered": alpha_centered},
                              peak_warmup=self.peak_warmup,
                              qscore=(qscore if isinstance(qscore, dict) else {}) if qscore else None,
                              max_classes=check_int("max_classes", max_classes, 2), taus=taus,
                              spectral=spectral)
        self._pending: list[tuple[str, Tensor, Tensor | None, int]] = []
        self._stream_order: list[str] = []
        self._weights: Any = None
        self._publisher = RunPublisher(self.run, self.rules, self._engine.tracker, self._errors,
                                       history, nc1_depth_threshold)
        self._captures: list[Capture] = []
        self._target = CaptureTarget(
            take=lambda stream, t, tokens: self._ingest(stream, t, tokens, from_hook=True),
            stage=self._stage, take_activations=self._ingest_activations,
            capturing=lambda: self._capturing, errors=self._errors, spent=self._overhead.add)
        self._callbacks: list[Callable[[Alert], Any]] = []
        self._generators: dict[torch.device, torch.Generator] = {}
        self.cuda_stream = bool(cuda_stream)
        self._staged: dict[str, Tensor] = {}     # CUDA-graph-captured hooks' static buffers
        self._side_streams: dict[torch.device, Any] = {}
        self._step = 0
        self._lock = threading.RLock()
        self._log_path = Path(log_path) if log_path is not None else None
        self._server: Any = None
        self._closed = False
        # --- sidecar mode (monitor/sink.py): rows go to the sink instead of the local engine
        self.sink: Any = None
        if sink is not None:
            from monitor.sink import make_sink

            self.sink = make_sink(sink, token=token, run=self.run)
        elif token is not None:
            raise ValueError("token= is only used together with sink=")
        # --- end sidecar mode
        from monitor.distributed import GlobalReducer, local_rank

        self.per_rank = bool(per_rank)
        self._reducer = GlobalReducer(self._errors)
        here = local_rank()
        if port is not None and self.per_rank and port != 0:
            port += here
            if port > 65535:
                raise ValueError(f"port + local rank ({port}) must be at most 65535")
        if port is not None and (self.per_rank or here == 0):
            from monitor.server import BackgroundServer, create_app

            app = create_app(lambda: self._publisher.latest,
                             lambda: list(self._publisher.history), self.rules)
            self._server = BackgroundServer(app, host, port)
            self._server.start()
            log.info("repwatch serving on %s", self._server.url)

    @property
    def strict(self) -> bool:
        """Re-raise errors inside repwatch instead of only counting them (debugging)."""
        return self._errors.strict

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
            from monitor.distributed import type_name

            name = type_name(module).lower()          # DDP(model), fully_shard → the model's type
            taken = {c.stream for c in self._captures}
            base, i = name, 1
            while name in taken:
                i += 1
                name = f"{base}{i}"
        check_name("stream name", name)
        capture = Capture(self._target, name, module, select, tokens or self.tokens)
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
            mode = tokens or self.tokens
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
        """Track plasticity of ``model``'s activation layers (Lyle; Sokar; Dohare).

        Finds every module of ``types`` (ReLU, GELU, SiLU, ...) or takes ``names`` (module
        paths as in ``model.named_modules()``, with or without the ``module.`` /
        ``_fsdp_wrapped_module.`` / ``_orig_mod.`` segments of DDP, FSDP and ``torch.compile``
        wrappers; layers are named without them). Per layer: τ-dormant fractions, low-activity
        and never-active fractions, and the effective rank / srank of the activations. A module
        object used at several places of the forward pass is one layer; give each place its
        own module (or use names) for per-place statistics.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"watch_activations() needs a torch.nn.Module, got {type(model).__name__}")
        from monitor.distributed import named_modules

        # names without DDP/FSDP/torch.compile wrapper segments ("module.", "_orig_mod.", ...)
        unwrapped = dict(named_modules(model))
        if names is not None:
            found = []
            for n in names:
                try:
                    mod = unwrapped[n] if n in unwrapped else model.get_submodule(n)
                except AttributeError:
                    raise ValueError(f"no submodule {n!r} in {type(model).__name__}; modules: "
                                     f"{list(unwrapped)[:20]}") from None
                found.append((next((k for k, v in unwrapped.items() if v is mod), n), mod))
        else:
            found = [(n, m) for n, m in unwrapped.items() if isinstance(m, types)]
            if not found:
                raise ValueError(f"no activation modules of types {[t.__name__ for t in types]} "
                                 f"in {type(model).__name__}; pass names=")
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

        def get() -> tuple[Tensor, Tensor | None]:
            bias = linear.bias.detach() if linear.bias is not None else None
            return linear.weight.detach(), bias

        self._engine.classifiers[stream or f"*{linear.in_features}"] = get

    def pair(self, fake: str, real: str, *, reservoir: int = 512,
             dup_quantile: float = 0.01) -> None:
        """Compare generated stream ``fake`` with real stream ``real`` (GAN mode collapse):
        diversity ratio, birthday-paradox duplicate rate and effective-rank ratio."""
        check_name("stream name", fake)
        check_name("stream name", real)
        if fake == real:
            raise ValueError("pair() needs two different streams")
        check_int("reservoir", reservoir, 4)
        if not 0.0 < dup_quantile < 1.0:
            raise ValueError(f"dup_quantile must be in (0, 1), got {dup_quantile}")
        with self._lock:
            self._engine.pair(fake, real, reservoir=reservoir, dup_quantile=dup_quantile,
                              seed=self.seed)

    def sample_scores(self, stream: str) -> tuple[Tensor, Tensor]:
        """Q-Scores of the last batch of ``stream`` and the rows' indices in that batch (for
        data triage: low scores are the samples the representation serves worst). Host sync."""
        self._join_side()
        with self._lock:
            st = self._engine.streams.get(stream)
            if st is None:
                raise KeyError(f"no stream {stream!r}; streams: {sorted(self._engine.streams)}")
            if st.qscore is None:
                raise RuntimeError("Q-Score is off for this monitor (Monitor(qscore=False))")
            scores, index = st.qscore.sample_scores()
            return scores.cpu(), index.cpu()  # sync: a user call, off the hot path

    def watch_weights(self, model: nn.Module, *, rank_every: int = 10, update_ratio: bool = True,
                      earlybird: Sequence[float] | None = (0.5, 0.8, 0.9)) -> None:
        """Per parameter at publish: weight norm, mean |w|, gradient norm and the
        update-to-weight ratio since the last publish (``update_ratio`` keeps one copy of the
        weights); every ``rank_every`` publishes the rank and stable rank of each matrix
        (Galanti et al.) and, with ``earlybird``, the early-bird mask distance at those
        sparsities (You et al. 2020)."""
        from monitor.weights_watch import WeightWatch

        if not isinstance(model, nn.Module):
            raise TypeError(f"watch_weights() needs a torch.nn.Module, got {type(model).__name__}")
        self._weights = WeightWatch(model, rank_every=check_int("rank_every", rank_every, 1),
                                    update_ratio=update_ratio, earlybird=earlybird)
        self._engine.param_sources.append(self._weights.param_signals)
        self._engine.run_sources.append(self._weights.run_signals)

    def watch_curvature(self, params: Any, *, every: int = 100, power_iters: int = 20,
                        refresh_every: int | None = None) -> None:
        """Turn on the curvature probe (off by default; docs/metrics.md §7a, §10): every ``every``
        steps, :meth:`probe_curvature` spends one Hessian-vector product on the current
        minibatch loss (plus ``power_iters`` HVPs when the top eigenvector is refreshed) and
        publishes ``hessian_top_eigenvalue`` and the sampled ``sgd_lyapunov_exponent``
        (Ziyin et al. 2023; the scalar sampled form is a design of docs/metrics.md, unverified
        against the paper). The probe synchronises the device at its cadence."""
        from monitor.curvature import CurvatureProbe

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

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    def _side(self, device: torch.device) -> Any:
        """repwatch's side CUDA stream on ``device`` (None on the CPU or with
        ``cuda_stream=False``)."""
        if device.type != "cuda" or not self.cuda_stream:
            return None
        side = self._side_streams.get(device)
        if side is None:
            side = torch.cuda.Stream(device=device)
            self._side_streams[device] = side
        return side

    @contextlib.contextmanager
    def _scoring(self, device: torch.device, *handed: Tensor | None) -> Iterator[None]:
        """Run the block's device work on the side stream of ``device``, after the current
        (training) stream's work queued so far (``wait_stream``: an event, no host sync).
        ``handed``: tensors made on the training stream and read on the side stream; their
        memory is kept from reuse until the side stream is done with them (``record_stream``).
        On the CPU or without a side stream: runs the block as is."""
        side = self._side(device)
        if side is None:
            yield
            return
        side.wait_stream(torch.cuda.current_stream(device))
        for t in handed:
            if t is not None and t.is_cuda:
                t.record_stream(side)
        with torch.cuda.stream(side):
            yield

    def _join_side(self) -> None:
        """Make each device's current stream wait for repwatch's side stream (an event, no
        host sync): before the training stream or the host reads or replaces repwatch's state
        (checkpoints, ``sample_scores``), and after a publish, whose new interval states the
        training stream's activation-layer updates use."""
        for device, side in self._side_streams.items():
            torch.cuda.current_stream(device).wait_stream(side)

    def _ingest(self, name: str, tensor: Any, tokens: Tokens, labels: Tensor | None = None,
                predictions: Tensor | None = None, from_hook: bool = False) -> None:
        rows = to_rows(tensor, tokens)                                   # (b, d)
        b = rows.shape[0]
        if b == 0 or rows.shape[1] == 0:
            return
        labels = _aligned("labels", labels, b)
        predictions = _aligned("predictions", predictions, b)
        if predictions is not None and labels is None:
            raise ValueError("predictions need labels too (to know which are misclassified)")
        rows, idx = subsample(rows, self.max_rows, self._generator(rows.device))
        if idx is not None:
            labels = labels.index_select(0, idx) if labels is not None else None
            predictions = predictions.index_select(0, idx) if predictions is not None else None
        if rows.dtype in (torch.float16, torch.bfloat16):
            rows = rows.float()             # exact; every sum downstream accumulates in float64
        if self.sink is not None:  # sidecar mode: ship (hook rows wait for step()'s labels)
            if from_hook and not (tensor.dim() == 3 and tokens == "all"):
                self._pending.append((name, rows.clone(), idx, b))        # async on device
            else:
                self.sink.submit(name, rows, labels, self._step + 1)
            return
        if self._side(rows.device) is not None and _shares_memory(rows, tensor):
            rows = rows.clone()             # the side stream must not see later in-place ops
        with self._lock, self._scoring(rows.device, rows, idx, labels, predictions):
            if name not in self._stream_order:
                self._stream_order.append(name)
            self._engine.update(name, rows, idx, labels, predictions)
            if from_hook and not (tensor.dim() == 3 and tokens == "all"):
                self._pending.append((name, rows, idx, b))   # step(labels=) may label them

    def _stage(self, name: str, rows: Tensor) -> None:
        """A hook fired while a CUDA graph was being captured: the graph gets a copy of the
        rows into a buffer of its own memory pool (same address at every replay); after each
        replay :meth:`step` scores what the buffer holds. Nothing else is recorded into the
        graph, so its replay costs one copy of ``(b, d)`` rows."""
        with self._lock:
            self._staged[name] = rows.detach().clone()

    def _score_staged(self) -> None:
        """Score the static buffers of graph-captured hooks (one batch per ``step()``)."""
        for name, buf in list(self._staged.items()):
            with self._errors.guard("capture", key=f"capture[{name}]"), torch.no_grad():
                self._ingest(name, buf, "mean", from_hook=True)

    def _ingest_activations(self, name: str, h: Tensor) -> None:
        from monitor.functional.plasticity import pooled_unit_rows

        rows = pooled_unit_rows(h)                                       # (n, units)
        if rows.shape[0] == 0 or rows.shape[1] == 0:
            return
        rows, _ = subsample(rows, self.max_rows, self._generator(rows.device))
        with self._lock:
            self._engine.update_layer(name, h, rows)

    # ------------------------------------------------------------------ publish

    @property
    def step_count(self) -> int:
        """Optimizer steps counted by :meth:`step`."""
        return self._step

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
            self._score_staged()
        pending, self._pending = self._pending, []
        if self.sink is not None:
            self._ship_pending(pending, labels)
        elif labels is not None:
            with self._errors.guard("labels"):
                self._label_pending(pending, labels)
        before = self._step
        self._step += steps
        period = self.every * self._overhead.stretch
        snap = None
        self._overhead.add(time.perf_counter() - t0)
        if publish_due(before, self._step, period):
            snap = self.publish()                     # times itself
        self._calls += 1
        self._capturing = self._overhead.captures(self._calls + 1)
        return snap

    @property
    def effective_cadence(self) -> int:
        """Current stretch k of the overhead budget: every k-th step is captured (1: all)."""
        return self._overhead.stretch

    def _may_adapt(self) -> bool:
        """False under torch.distributed with global reduction: every rank must publish at
        the same steps, so no rank may stretch its cadence on its own timings."""
        if self.per_rank or self.sink is not None:
            return True
        import torch.distributed as dist

        together = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if together and self._overhead.budget is not None and not self._adapt_warned:
            self._adapt_warned = True
            log.warning("repwatch: overhead_budget is not adapted under torch.distributed with "
                        "global reduction (ranks publish together); the ratio is still measured")
        return not together

    def _label_pending(self, pending: list[tuple[str, Tensor, Tensor | None, int]],
                       labels: Tensor) -> None:
        with torch.no_grad():
            for name, rows, idx, b in pending:
                lab = _aligned("labels", labels, b)
                assert lab is not None
                lab = lab.to(rows.device)
                if idx is not None:
                    lab = lab.index_select(0, idx)
                with self._lock, self._scoring(rows.device, lab):
                    self._engine.update_labels(name, rows, lab)

    def _ship_pending(self, pending: list[tuple[str, Tensor, Tensor | None, int]],
                      labels: Tensor | None) -> None:
        """Sidecar mode: send the hook rows of this step, labelled when ``labels`` is given."""
        for name, rows, idx, b in pending:
            with self._errors.guard("sink", key=f"sink[{name}]"):
                lab = None
                if labels is not None:
                    with self._errors.guard("labels"):
                        aligned = _aligned("labels", labels, b)
                        assert aligned is not None
                        aligned = aligned.to(rows.device)
                        lab = aligned.index_select(0, idx) if idx is not None else aligned
                with torch.no_grad():
                    self.sink.submit(name, rows, lab, self._step + 1)

    def publish(self) -> Snapshot:
        """Compute every stream now (one host sync), evaluate alerts, notify, export."""
        t0 = time.perf_counter()
        with self._lock, contextlib.ExitStack() as on_side:
            for device in list(self._side_streams):   # publish behind the queued updates
                on_side.enter_context(self._scoring(device))
            result = EngineResult()
            with self._errors.guard("publish"):
                if self.per_rank or self.sink is not None:
                    result = self._engine.compute(step=self._step)
                else:   # all ranks reduce here (same cadence); single process: engine.compute
                    result = self._reducer.compute(self._engine, step=self._step)
            self._engine.after_publish()
            ratio, stretch = self._overhead.close_window(self._may_adapt())
            snap, fired, resolved = self._publisher.publish(
                result, self._step, t0, order=self._stream_order,
                dropped=({k: float(v) for k, v in self.sink.counts().items()}
                         if self.sink is not None else {}),
                overhead_ratio=ratio, effective_cadence_steps=float(stretch),
                rank=self._rank_label())
        self._join_side()
        for alert in fired:
            log.warning("ALERT %s [%s] firing on %s/%s at step %d: %s", alert.name,
                        alert.severity, self.run, alert.stream, self._step, alert.description)
            for callback in list(self._callbacks):
                name = getattr(callback, "__name__", callback)
                with self._errors.guard("callback", key=f"callback[{name}]"):
                    callback(alert)
        for alert in resolved:
            log.warning("RESOLVED %s on %s/%s at step %d", alert.name, self.run, alert.stream,
                        self._step)
        if self._log_path is not None:
            try:
                with self._log_path.open("a") as fh:
                    fh.write(json.dumps(snap.to_dict()) + "\n")
            except Exception as exc:
                self._errors.record("log", exc)
        self._overhead.add(time.perf_counter() - t0)
        return snap

    def _rank_label(self) -> int | None:
        """The ``rank`` label of a per-rank publish (None: global values, no label)."""
        if not self.per_rank:
            return None
        from monitor.distributed import global_rank

        return global_rank()

    @property
    def latest(self) -> Snapshot | None:
        """The latest Snapshot (None before the first publish)."""
        return self._publisher.latest

    @property
    def history(self) -> list[Snapshot]:
        """Recent snapshots, oldest first (bounded)."""
        return list(self._publisher.history)

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
        self._join_side()
        with self._lock:
            return {
                "version": 1, "run": self.run, "step": self._step,
                "engine": self._engine.state_dict(),
                "alerts": self._publisher.alerts.state_dict(),
                "errors": self._errors.counts(),
                "generators": {str(d): g.get_state() for d, g in self._generators.items()},
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (streams on CUDA load on the CPU when CUDA is absent)."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("not a repwatch Monitor state_dict (version 1)")
        self._join_side()

        def device_map(name: str) -> torch.device:
            dev = torch.device(name)
            return dev if dev.type != "cuda" or torch.cuda.is_available() else torch.device("cpu")

        with self._lock:
            self._step = int(state["step"])
            self._engine.load_state_dict(state["engine"], device_map)
            self._hand_streams_to_side()
            self._publisher.alerts.load_state_dict(state["alerts"])
            self._errors.load(state.get("errors", {}))
            self._generators.clear()
            for name, gstate in state.get("generators", {}).items():
                dev = device_map(name)
                if dev.type == torch.device(name).type:
                    self._generator(dev).set_state(gstate)

    def _hand_streams_to_side(self) -> None:
        """Loaded stream states were made on the current stream but live on the side stream:
        keep their memory from reuse until the side stream's work on them is done."""
        from monitor.memory import device_tensors

        for stream in self._engine.streams.values():
            side = self._side(stream.device)
            if side is not None:
                for t in device_tensors(stream):
                    t.record_stream(side)

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
        if self.sink is not None:
            self.sink.close()

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


"""MonitorConfig: every option of a :class:`~monitor.Monitor`, validated once, frozen."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from monitor.alerts import DEFAULT_RULES, AlertRule
from monitor.validation import check_int, check_name

Tokens = Literal["mean", "cls", "all"]
TOKEN_MODES: tuple[str, ...] = ("mean", "cls", "all")
CaptureMode = Literal["train", "always", "eval"]
CAPTURE_MODES: tuple[str, ...] = ("train", "always", "eval")
"""When a forward hook captures: only while the hooked module is in training mode (``"train"``),
always, or only in eval mode (``"eval"``)."""
DEFAULT_MAX_CLASSES = 1000
"""Label capacity of neural collapse when neither ``max_classes`` nor a classifier gives one."""
DEFAULT_PORT = 9400
"""The in-process server's port when none is given (the sidecar's default port too)."""


@dataclass(frozen=True)
class MonitorConfig:
    """The options of a Monitor (``Monitor(**options)`` builds one; bad values raise here).

    Attributes:
        run: run label on every metric.
        every: publish every ``every`` calls of ``step()``.
        max_rows: at most this many rows per captured batch (uniform subsample, own RNG).
            ``observe()`` takes its own ``max_rows=``; an evaluation batch (``observe`` with
            ``predictions=``) keeps all its rows by default (at most ``window``).
        window: rows in each stream's sliding scoring window.
        port: HTTP port for ``/metrics`` and the dashboard at ``/`` (0: any free port; None: no
            server; ``"auto"``, the default: 9400, or no server in sidecar mode, whose metrics
            live on the sidecar). Only local rank 0 (``LOCAL_RANK``, else
            ``rank % LOCAL_WORLD_SIZE``) serves. A port in use is logged and counted (under
            ``server``) and training goes on without a server; ``strict=True`` raises.
        host: address to bind (loopback by default).
        tokens: default reduction of ``(b, T, d)`` token outputs: ``"mean"``, ``"cls"``, ``"all"``.
        seed: seed of the monitor's own sampling generator.
        rules: alert rules (default :data:`monitor.alerts.DEFAULT_RULES`).
        history: snapshots kept in memory for ``/v1/runs/{run}/history``.
        log_path: optional JSONL file, one snapshot per publish.
        alpha_centered: fit α-ReQ on the centred spectrum (a second eigendecomposition).
        strict: re-raise errors inside repwatch instead of only counting them (debugging).
        peak_warmup: steps before the peak effective rank starts being tracked (a fresh
            network's rank is high and falls as training starts: learning, not collapse).
        qscore: score every stream's rows with Q-Score (Kalibhat et al.), or a dict of
            :class:`monitor.scorers.qscore.QScoreScorer` options, or False.
        dormant_taus: τ levels of the dormant-unit fractions of watched activation layers.
        max_classes: label capacity of the neural-collapse statistics (labels ≥ it are
            counted as out of range and skipped). None (the default): the ``out_features`` of
            the classifier given to ``watch_classifier`` (the largest, with several), else
            1000. NC3/NC4 take a classifier of any number of classes either way.
        nc1_depth_threshold: NC1 level that defines the "effective depth" (first watched
            stream, in watch order, whose NC1 is below it).
        sink: sidecar mode (:mod:`monitor.transport`): the URL of a ``repwatch serve`` sidecar
            (``"http://127.0.0.1:9400"``), an ``shm://`` ring or a sink object. Captured rows
            (after subsampling, with their labels) are shipped from a background thread
            instead of being scored here; the metrics live on the sidecar, and the sink's
            thread reads the run's snapshots back (:mod:`monitor.transport.readback`): a
            ``publish()`` merges the sidecar's latest values and alerts with the local ones
            (errors, the sink's dropped rows by reason), and ``on_alert`` fires for the
            sidecar's alerts. Activation layers, weights and ``predictions=`` are not shipped
            and stay local.
        token: bearer token of the sidecar (with a URL ``sink``).
        per_rank: under ``torch.distributed``, publish each rank's own values with a ``rank``
            label, every rank serving on ``port + local rank``. By default every publish
            reduces the scorers' sufficient statistics across ranks
            (:mod:`monitor.engine.distributed`) and only local rank 0 serves.
        overhead_budget: keep repwatch's own host time per step under this fraction of the
            training step's (``0.01``: 1%), by host timers only (:mod:`monitor.engine.overhead`).
            Over budget only every k-th step is captured and publishes come every ``every·k``
            steps (k in 1–64). None: measure only. Not adapted under torch.distributed with
            global reduction (ranks publish together).
        spectral_path: a stream's window state: ``"exact"`` (float64 d×d second moment),
            ``"sketch"`` (a seeded Gaussian projection to ``sketch_dim`` dimensions;
            APPROXIMATE, see docs/performance.md "Large d") or ``"auto"`` (sketch when
            d > ``sketch_above`` or when the exact state would exceed ``memory_limit_bytes``).
            A dict maps stream/layer names to a mode (key ``"*"``: the others). In-process only.
        sketch_above: dimension above which ``"auto"`` sketches.
        sketch_dim: k, the sketch's dimension.
        memory_limit_bytes: per-stream limit on the exact state for ``"auto"`` (None: none).
        cuda_stream: on a GPU, score streams on a side CUDA stream of repwatch's own
            (:mod:`monitor.engine.side_streams`): the training stream only records an event.
        capture: when forward hooks (``watch``, ``watch_activations``) capture: ``"train"``
            (the default) only while the hooked module is in training mode (its
            ``.training``; for a DDP/DataParallel/``torch.compile`` wrapper, the wrapped
            module's too), so validation passes under ``model.eval()`` stay out of the
            training windows; ``"always"``; or ``"eval"`` (only in eval mode, e.g. a stream of
            validation features). ``torch.no_grad()`` alone does not stop capture (an EMA
            teacher runs in training mode under it); ``Monitor.paused()`` stops it for a block.
            ``watch(capture=)`` overrides it per stream; ``observe()`` is not filtered by it
            (an explicit call), though ``paused()`` stops it too.
    """

    run: str = "default"
    every: int = 10
    max_rows: int = 256
    window: int = 8192
    port: int | None | Literal["auto"] = "auto"
    host: str = "127.0.0.1"
    tokens: Tokens = "mean"
    seed: int = 0
    rules: Sequence[AlertRule] = DEFAULT_RULES
    history: int = 512
    log_path: str | os.PathLike[str] | None = None
    alpha_centered: bool = False
    strict: bool = False
    peak_warmup: int = 100
    qscore: bool | dict[str, Any] = True
    dormant_taus: Sequence[float] = (0.0, 0.025, 0.1)
    max_classes: int | None = None
    nc1_depth_threshold: float = 0.1
    sink: Any = None
    token: str | None = None
    per_rank: bool = False
    overhead_budget: float | None = None
    spectral_path: str | Mapping[str, str] = "auto"
    sketch_above: int = 4096
    sketch_dim: int = 2048
    memory_limit_bytes: int | None = None
    cuda_stream: bool = True
    capture: CaptureMode = "train"

    def __post_init__(self) -> None:
        check_name("run", self.run)
        for name, low in (("every", 1), ("max_rows", 1), ("window", 2), ("seed", 0),
                          ("history", 1), ("peak_warmup", 0)):
            check_int(name, getattr(self, name), low)
        if self.max_classes is not None:
            check_int("max_classes", self.max_classes, 2)
        if self.max_rows > self.window:
            raise ValueError(f"max_rows ({self.max_rows}) must not exceed window ({self.window})")
        if self.port == "auto":
            object.__setattr__(self, "port", None if self.sink is not None else DEFAULT_PORT)
        if self.port is not None and (check_int("port", self.port, 0) > 65535):
            raise ValueError(f"port must be 0–65535 or None, got {self.port}")
        if self.tokens not in TOKEN_MODES:
            raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {self.tokens!r}")
        if self.capture not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {self.capture!r}")
        if not all(isinstance(r, AlertRule) for r in self.rules):
            raise TypeError("rules must be a sequence of monitor.alerts.AlertRule")
        object.__setattr__(self, "rules", tuple(self.rules))
        if not isinstance(self.qscore, (bool, dict)):
            raise TypeError(f"qscore must be True, False or a dict of options, got {self.qscore!r}")
        taus = tuple(float(t) for t in self.dormant_taus)
        if not taus or any(not 0.0 <= t < 1.0 for t in taus):
            raise ValueError(f"dormant_taus must be levels in [0, 1), got {self.dormant_taus!r}")
        object.__setattr__(self, "dormant_taus", taus)
        if self.token is not None and self.sink is None:
            raise ValueError("token= is only used together with sink=")

    @property
    def qscore_options(self) -> dict[str, Any] | None:
        """QScoreScorer options (None: Q-Score off)."""
        if not self.qscore:
            return None
        return dict(self.qscore) if isinstance(self.qscore, dict) else {}

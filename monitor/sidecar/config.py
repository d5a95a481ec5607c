"""SidecarConfig: the settings of ``repwatch serve``, validated once (torch-free)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from monitor.alerts import DEFAULT_RULES, AlertRule
from monitor.engine.run import DEFAULT_MAX_STEP_JUMP
from monitor.validation import check_int

DEFAULT_MEMORY_BUDGET_MB = 640.0
"""The default memory budget: what fits the shipped k8s sidecar's 1 GiB limit beside the
process's own peak (97 MiB when ready, ONNX backend) with room for bodies being read
(``benchmarks/sidecar_memory.py``; docs/operations.md "Limits and failure modes")."""

BACKEND_NAMES: list[str] = ["auto", "onnx", "torch"]
"""The scoring backends (their factories: ``monitor.sidecar.service.BACKENDS``): ``onnx``, ONNX
Runtime kernels + the shared array-API publish, no torch; ``torch``, one in-process Monitor per
run (every signal); ``auto``, onnx when ONNX Runtime is installed. A harness that registers a
backend of its own adds its name here too."""


@dataclass
class SidecarConfig:
    """Settings of the sidecar service (``repwatch serve`` flags).

    ``every``/``window``/``history``/``rules`` go to each run's Monitor (``monitor_options``:
    any further ``Monitor`` keyword, e.g. ``peak_warmup``). ``token``: required on every write
    when set. ``queue_batches``: capacity of the scoring queue (429 beyond it);
    ``admit_wait_seconds``: how long a POST, its body read, waits for room in a full queue
    before 429 (short bursts are absorbed instead of answered 429 and re-sent). ``threads``:
    intra-op threads of the ONNX Runtime backend (a sidecar shares the pod's cores);
    ``io_binding``: the ONNX backend keeps the window sums on the device (None: with CUDA only).
    ``workers``: scoring threads (runs are scored in parallel, each run's batches in order by
    one of them: :mod:`monitor.sidecar.scheduler`); ``queue_batches_per_run``: the places of
    the queue one run may hold (None: half of ``queue_batches``), so a slow run (a publish at
    large d) leaves room for the others. ``memory_budget_mb``: the bytes the service's scoring
    state and queued batches may hold (a new stream that would pass it is refused with 409, a
    batch with 429); see ``docs/operations.md`` "Limits and failure modes".
    ``max_step_jump``: the largest forward jump of a run's step between two batches (a larger
    one is counted under the run's ``step`` errors and not applied; a step going back below the
    last publish is a resume: :class:`monitor.engine.run.BatchClock`).

    Slow or idle clients: a batch's body must arrive within ``body_timeout_seconds`` (408
    beyond; it is read before a queue place is taken, so a withheld body holds none); a request
    head within ``header_timeout_seconds`` of the connection opening or of the previous answer;
    an idle kept-alive connection is closed after ``keep_alive_seconds``; at most
    ``max_connections`` connections are open (requests beyond answer 503). Bodies being read at
    once take at most ``max_connections × max_body_bytes`` (``monitor.server.app.server_config``).
    """

    host: str = "127.0.0.1"
    port: int = 9400
    token: str | None = None
    backend: str = "auto"
    device: str = "auto"
    every: int = 10
    window: int = 8192
    history: int = 512
    max_body_bytes: int = 64 << 20
    max_rows_per_batch: int = 65536
    max_dim: int = 16384
    max_streams_per_run: int = 64
    max_runs: int = 64
    queue_batches: int = 64
    admit_wait_seconds: float = 0.25
    body_timeout_seconds: float = 30.0
    header_timeout_seconds: float = 10.0
    keep_alive_seconds: float = 5.0
    max_connections: int = 128
    retry_after_seconds: int = 1
    threads: int = 1
    io_binding: bool | None = None
    workers: int = 2
    queue_batches_per_run: int | None = None
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB
    max_step_jump: int = DEFAULT_MAX_STEP_JUMP
    rules: Sequence[AlertRule] = DEFAULT_RULES
    monitor_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("every", "window", "history", "max_body_bytes", "max_rows_per_batch",
                     "max_dim", "max_streams_per_run", "max_runs", "queue_batches",
                     "retry_after_seconds", "threads", "max_step_jump", "workers"):
            check_int(name, getattr(self, name), 1)
        wait = self.admit_wait_seconds
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 60:
            raise ValueError(f"admit_wait_seconds must be a number in [0, 60], got {wait!r}")
        for name in ("body_timeout_seconds", "header_timeout_seconds", "keep_alive_seconds"):
            t = getattr(self, name)
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 3600:
                raise ValueError(f"{name} must be a number of seconds in (0, 3600], got {t!r}")
        check_int("max_connections", self.max_connections, 1)
        share = self.queue_batches_per_run
        if share is not None:
            check_int("queue_batches_per_run", share, 1)
            if share > self.queue_batches:
                raise ValueError(f"queue_batches_per_run ({share}) must not exceed "
                                 f"queue_batches ({self.queue_batches})")
        budget = self.memory_budget_mb
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (
                16 <= budget <= 1 << 30):
            raise ValueError(f"memory_budget_mb must be a number of MiB >= 16, got {budget!r}")
        if self.io_binding not in (None, True, False):
            raise ValueError(f"io_binding must be None, True or False, got {self.io_binding!r}")
        if self.window < 2:
            raise ValueError(f"window must be >= 2, got {self.window}")
        if self.token is not None and (not isinstance(self.token, str) or not self.token.strip()):
            raise ValueError("token must be a non-empty string (or None for no token)")
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {tuple(BACKEND_NAMES)}, got {self.backend!r}")
        if not isinstance(self.device, str) or not (
                self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def run_share(self) -> int:
        """Places of the scoring queue one run may hold."""
        if self.queue_batches_per_run is not None:
            return self.queue_batches_per_run
        return max(1, self.queue_batches // 2)

    @property
    def memory_budget_bytes(self) -> int:
        """``memory_budget_mb`` in bytes."""
        return int(self.memory_budget_mb * (1 << 20))

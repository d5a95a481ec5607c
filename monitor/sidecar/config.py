"""SidecarConfig: the settings of ``repwatch serve``, validated once (torch-free)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from monitor.alerts import DEFAULT_RULES, AlertRule
from monitor.validation import check_int

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
    ``admit_wait_seconds``: how long a POST waits for room in a full queue before its body is
    read (short bursts are absorbed instead of answered 429 and re-sent). ``threads``:
    intra-op threads of the ONNX Runtime backend (a sidecar shares the pod's cores);
    ``io_binding``: the ONNX backend keeps the window sums on the device (None: with CUDA only).
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
    retry_after_seconds: int = 1
    threads: int = 1
    io_binding: bool | None = None
    rules: Sequence[AlertRule] = DEFAULT_RULES
    monitor_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("every", "window", "history", "max_body_bytes", "max_rows_per_batch",
                     "max_dim", "max_streams_per_run", "max_runs", "queue_batches",
                     "retry_after_seconds", "threads"):
            check_int(name, getattr(self, name), 1)
        wait = self.admit_wait_seconds
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 60:
            raise ValueError(f"admit_wait_seconds must be a number in [0, 60], got {wait!r}")
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

"""`repwatch demo`: SimSiam on scikit-learn's digits, watched live by repwatch.

With stop-gradient the representation stays healthy and no alert fires; without it (Chen & He
2021, Table/Fig. 2: the ablation collapses) every input maps to one vector, and repwatch's
collapse alerts fire while the run is still going. ``collapse_at`` removes the stop-gradient
mid-run, so one run shows both phases.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from monitor.monitor import Monitor
from monitor.snapshot import Alert, Snapshot

log = logging.getLogger("repwatch.demo")


@dataclass
class DemoResult:
    """What a demo run produced."""

    snapshots: list[Snapshot] = field(default_factory=list)
    fired: list[tuple[int, Alert]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    url: str | None = None
    seconds: float = 0.0
    model: torch.nn.Module | None = None

    def first_fired(self, name: str, stream: str | None = None) -> int | None:
        """Step at which alert ``name`` first fired (on ``stream`` if given), else None."""
        for step, alert in self.fired:
            if alert.name == name and (stream is None or alert.stream == stream):
                return step
        return None


def linger_serving(mon: Monitor, seconds: float) -> None:
    """Keep the monitor's server up for ``seconds`` after training (Ctrl-C ends it early)."""
    if mon.url is None or seconds <= 0:
        return
    try:
        time.sleep(seconds)
    except KeyboardInterrupt:
        pass


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def run_demo(steps: int = 600, collapse_at: int | None = None, seed: int = 0,
             device: str = "auto", every: int = 10, window: int = 2048,
             port: int | None = None, host: str = "127.0.0.1", run: str | None = None,
             on_publish: Callable[[Snapshot, float], None] | None = None,
             monitor_enabled: bool = True, linger: float = 0.0,
             on_done: Callable[[DemoResult], None] | None = None,
             on_start: Callable[[str | None], None] | None = None,
             sink: str | None = None, token: str | None = None) -> DemoResult:
    """Train SimSiam for ``steps`` steps with repwatch attached; no stop-gradient from
    ``collapse_at`` on (``None``: never; ``0``: the whole run). After training, the server keeps
    serving the final state for ``linger`` seconds (Ctrl-C ends it early). With ``sink`` (a
    sidecar URL, ``token`` its bearer token) the rows are shipped there and scored by the sidecar
    (sidecar mode)."""
    from monitor.tools.demo_model import build, train_step

    dev = pick_device(device)
    setup = build(seed=seed, device=dev)
    result = DemoResult(model=setup.model)
    name = run or ("demo-collapse" if collapse_at is not None else "demo")
    mon = Monitor(run=name, every=every, max_rows=256, window=window,
                  port=None if sink else port, host=host, sink=sink,
                  token=token if sink else None) if monitor_enabled else None
    t0 = time.perf_counter()
    try:
        if mon is not None:
            result.url = mon.url
            if on_start is not None:
                on_start(mon.url)
            mon.watch(setup.model.backbone, name="backbone")
            mon.watch(setup.model.projector, name="projector")
            mon.on_alert(lambda a: result.fired.append((mon.step_count, a)))
        for step in range(1, steps + 1):
            stop_gradient = collapse_at is None or step <= collapse_at
            loss = train_step(setup, stop_gradient=stop_gradient)
            if mon is None:
                result.losses.append(float(loss))  # sync: only without a monitor, for tests
                continue
            snap = mon.step()
            if snap is not None:
                value = float(loss)  # sync: once per publish, for the terminal
                result.losses.append(value)
                result.snapshots.append(snap)
                if on_publish is not None:
                    on_publish(snap, value)
        result.seconds = time.perf_counter() - t0
        if on_done is not None:
            on_done(result)
        if mon is not None:
            linger_serving(mon, linger)
    finally:
        result.seconds = result.seconds or time.perf_counter() - t0
        if mon is not None:
            mon.close()
    return result


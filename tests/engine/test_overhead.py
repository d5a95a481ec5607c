"""Monitor(overhead_budget=...): host-time accounting and the cadence stretch (issue 7)."""

from __future__ import annotations

import math
import time
import types
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import monitor.capture.hooks
import monitor.monitor
from exporters.prometheus import make_registry, render
from monitor import Monitor, Snapshot
from monitor.engine.overhead import MAX_STRETCH, OverheadBudget
from tests.toy_training import train_toy


class FakeClock:
    """A ``perf_counter`` that moves only when the test says so (deterministic timings)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _fake_time(monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> None:
    fake = types.SimpleNamespace(perf_counter=clock, time=time.time)
    monkeypatch.setattr(monitor.monitor, "time", fake)
    monkeypatch.setattr(monitor.capture.hooks, "time", fake)


def _slow_ingest(monkeypatch: pytest.MonkeyPatch, advance: Any) -> list[int]:
    """Make every capture cost something (``advance()``); returns a list counting captures."""
    calls: list[int] = []
    original = Monitor._ingest

    def ingest(self: Monitor, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        advance()
        original(self, *args, **kwargs)

    monkeypatch.setattr(Monitor, "_ingest", ingest)
    return calls


def _run_fake(monkeypatch: pytest.MonkeyPatch, budget: float | None, train_s: float,
              capture_s: float, steps: int, every: int = 2, per_call: int = 1
              ) -> tuple[list[float], list[Snapshot], int, list[int]]:
    """Toy training under a fake clock: each step's training takes ``train_s``, each captured
    batch ``capture_s``. Returns losses, snapshots, steps seen by ``select``, capture calls."""
    clock = FakeClock()
    _fake_time(monkeypatch, clock)

    def advance() -> None:
        clock.now += capture_s

    calls = _slow_ingest(monkeypatch, advance)
    selected: list[int] = []
    snaps: list[Snapshot] = []

    def select(out: torch.Tensor) -> torch.Tensor:
        selected.append(1)
        return out

    def attach(model: nn.Sequential) -> Monitor:
        mon = Monitor(run="budget", every=every, max_rows=16, window=256, port=None,
                      overhead_budget=budget)
        mon.watch(model[1], name="hidden", select=select)
        return mon

    def on_step(mon: Monitor, logits: torch.Tensor, y: torch.Tensor) -> None:
        clock.now += train_s
        snap = mon.step(per_call)
        if snap is not None:
            snaps.append(snap)

    losses, mon = train_toy(0, steps, attach, on_step)
    assert mon is not None
    mon.close()
    return losses, snaps, len(selected), calls


def test_tight_budget_stretches_cadence_and_keeps_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    train_s, capture_s, budget = 0.010, 0.005, 0.05
    losses, snaps, selected, calls = _run_fake(monkeypatch, budget, train_s, capture_s, 400)
    cadences = [s.effective_cadence_steps for s in snaps]
    ratios = [s.overhead_ratio for s in snaps if math.isfinite(s.overhead_ratio)]
    # the smallest power-of-two stretch that brings capture_s/train_s per step under budget
    need = next(k for k in (2 ** i for i in range(7)) if capture_s / train_s / k <= budget)
    assert cadences[0] >= 1 and cadences == sorted(cadences)          # only grows here
    assert cadences[-1] == need and all(1 <= c <= MAX_STRETCH for c in cadences)
    assert ratios[0] > budget and ratios[-1] <= budget               # measured ratio fell
    assert ratios[-1] < ratios[0] / 4
    # skipped steps never reached the hook's work (select) nor the capture
    assert selected == len(calls) < 400 / 4
    # publishes come every every*k steps once stretched
    gaps = [b.step - a.step for a, b in zip(snaps, snaps[1:], strict=False)]
    assert gaps[-1] == 2 * need
    # the monitor never changes training: bit-identical losses without it
    plain, _ = train_toy(0, 400)
    assert losses == plain


def test_stride_counts_step_calls_so_multi_step_calls_still_capture(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``step(4)`` per call (e.g. a callback after gradient accumulation): the stretched
    cadence must still capture, not wait for a step number it jumps over."""
    _, snaps, selected, _ = _run_fake(monkeypatch, 0.05, 0.010, 0.005, 200, per_call=4)
    stretched = [s for s in snaps if s.effective_cadence_steps >= 8]
    assert len(stretched) >= 2
    first, last = (s.get("samples", "hidden") for s in (stretched[0], stretched[-1]))
    assert last > first                                # rows still scored once stretched
    assert selected < 200


def test_generous_budget_and_no_budget_keep_base_cadence(monkeypatch: pytest.MonkeyPatch) -> None:
    _, generous, sel_g, _ = _run_fake(monkeypatch, 10.0, 0.010, 0.005, 60)
    monkeypatch.undo()
    _, measured, sel_n, _ = _run_fake(monkeypatch, None, 0.010, 0.005, 60)
    for snaps, selected in ((generous, sel_g), (measured, sel_n)):
        assert [s.effective_cadence_steps for s in snaps] == [1.0] * len(snaps)
        assert [s.step for s in snaps] == list(range(2, 61, 2))
        assert selected == 60                                          # every step captured
    # without a budget the ratio is still measured: ~capture/train, well above zero
    last = measured[-1].overhead_ratio
    assert 0.005 / 0.010 * 0.9 < last < 0.005 / 0.010 * 1.1


def _window(ob: OverheadBudget, clock: list[float], ratio: float, intervals: int,
            may_adapt: bool = True) -> tuple[float, int]:
    """Feed ``intervals`` step() intervals of 1 s training plus ``ratio`` s of repwatch each,
    then close the window."""
    if clock[0] == 0.0:
        ob.tick(clock[0])
    for _ in range(intervals):
        ob.add(ratio)
        clock[0] += 1.0 + ratio
        ob.tick(clock[0])
    return ob.close_window(may_adapt)


def test_under_budget_shrinks_back_with_hysteresis() -> None:
    ob = OverheadBudget(0.1)
    ob.stretch = 8
    clock = [0.0]
    history = [_window(ob, clock, r, 16)[1] for r in (0.05, 0.05, 0.09) + (0.02,) * 12]
    # 5-9% sits between budget/4 and budget: no change; at 2% (< budget/4) it halves, one
    # window at a time, down to the base cadence and no further
    assert history[:3] == [8, 8, 8]
    assert all(b in (a, a // 2) for a, b in zip(history, history[1:], strict=False))
    assert history[-1] == 1 and history.count(4) >= 1 and history.count(2) >= 1
    fresh = OverheadBudget(0.1)
    ratio, k = fresh.close_window()                        # no step() seen: nothing measured
    assert math.isnan(ratio) and k == 1


def test_short_windows_carry_over_until_they_span_the_stride() -> None:
    ob = OverheadBudget(0.1)
    ob.stretch = 8
    clock = [0.0]
    assert math.isnan(_window(ob, clock, 0.5, 15)[0])        # < 2k intervals: not measured
    ratio, k = _window(ob, clock, 0.3, 1)                    # now 16: one window of both
    assert ratio == pytest.approx((15 * 0.5 + 0.3) / 16) and k == 16


def test_stretch_is_bounded_and_not_adapted_when_told() -> None:
    ob = OverheadBudget(0.001)
    clock = [0.0]
    for _ in range(20):
        ratio, k = _window(ob, clock, 0.5, 2 * MAX_STRETCH)
        assert ratio == pytest.approx(0.5)
    assert k == MAX_STRETCH
    frozen = OverheadBudget(0.001)
    assert _window(frozen, [0.0], 0.5, 8, may_adapt=False) == (pytest.approx(0.5), 1)


@pytest.mark.parametrize("bad", [0, -0.1, math.nan, math.inf, True, "0.01"])
def test_constructor_rejects_bad_budget(bad: object) -> None:
    with pytest.raises(ValueError, match="overhead_budget must be a positive finite ratio"):
        Monitor(port=None, overhead_budget=bad)  # type: ignore[arg-type]


@pytest.mark.slow
def test_real_timers_tight_budget_lowers_ratio_and_exports(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """Real host timers (no fake clock): a 2 ms capture against a 2 ms training step."""
    _slow_ingest(monkeypatch, lambda: time.sleep(0.002))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    mon = Monitor(run="real", every=2, max_rows=16, window=256, port=None, overhead_budget=0.1)
    mon.watch(model[0], name="hidden")
    snaps = []
    deadline = time.monotonic() + 20.0
    for _ in range(400):
        model(torch.randn(32, 8))
        time.sleep(0.002)                                   # the "training" step
        snap = mon.step()
        if snap is not None:
            snaps.append(snap)
        if time.monotonic() > deadline:                      # bounded on a loaded machine
            break
    mon.close()
    ratios = [s.overhead_ratio for s in snaps if math.isfinite(s.overhead_ratio)]
    assert ratios[0] > 0.1                                   # ~1 before any stretch
    assert ratios[-1] < ratios[0] / 2
    assert snaps[-1].effective_cadence_steps >= 4 and mon.effective_cadence >= 4
    text = render(make_registry(lambda: snaps[-1:])).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    (ratio,) = fams["repwatch_overhead_ratio"].samples
    (cadence,) = fams["repwatch_effective_cadence_steps"].samples
    assert ratio.labels == {"run": "real"} and ratio.value == pytest.approx(ratios[-1])
    assert cadence.value == snaps[-1].effective_cadence_steps


def test_sidecar_style_snapshot_exports_no_overhead() -> None:
    text = render(make_registry(lambda: [Snapshot(run="s", step=1, time=0.0)])).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["repwatch_overhead_ratio"].samples == []        # NaN: not measured there
    assert fams["repwatch_effective_cadence_steps"].samples == []
    assert len(fams["repwatch_training_step"].samples) == 1

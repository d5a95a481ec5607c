"""Monitor: public API, capture shapes, own RNG (bit-identical training), errors never escape."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from monitor import Monitor, Snapshot
from monitor import functional as F
from tests.toy_training import train_toy


def _train(seed: int, attach: bool, steps: int = 30) -> list[float]:
    def monitor(model: nn.Sequential) -> Monitor:
        mon = Monitor(run="bitwise", every=5, max_rows=16, window=256, port=None, seed=123)
        mon.watch(model[1], name="hidden")     # subsamples 64 → 16 rows: draws random numbers
        mon.watch(model[4], name="penultimate")
        return mon

    def step(mon: Monitor, logits: torch.Tensor, y: torch.Tensor) -> None:
        mon.observe("logits", logits)
        mon.step()

    losses, mon = train_toy(seed, steps, monitor if attach else None, step)
    if mon is not None:
        assert mon.latest is not None and mon.latest.get("window_samples", "hidden") > 0
        mon.close()
    return losses


def test_training_is_bit_identical_with_and_without_monitor() -> None:
    without = _train(0, attach=False)
    with_mon = _train(0, attach=True)
    assert without == with_mon  # exact equality of every loss
    assert _train(1, attach=False) != without  # the comparison can fail


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="every must be an int >= 1, got 0"):
        Monitor(every=0, port=None)
    with pytest.raises(ValueError, match="max_rows .* must not exceed window"):
        Monitor(max_rows=512, window=256, port=None)
    with pytest.raises(ValueError, match="run must be"):
        Monitor(run="bad name!", port=None)
    with pytest.raises(ValueError, match="tokens must be one of"):
        Monitor(tokens="max", port=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="port must be"):
        Monitor(port=70000)
    mon = Monitor(port=None)
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        mon.watch("encoder")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        mon.on_alert(42)  # type: ignore[arg-type]


def test_capture_shapes_and_structured_outputs() -> None:
    mon = Monitor(port=None, window=512, max_rows=512)

    class Structured(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, object]:
            return {"ids": torch.arange(3), "hidden": (x * 2, x)}

    class Tokens(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(x.shape[0], 4, -1)

    conv = nn.Conv2d(3, 6, 3)
    s, t = Structured(), Tokens()
    mon.watch(s, name="dict")
    mon.watch(s, name="picked", select=lambda out: out["hidden"][1])
    mon.watch(t, name="mean")
    mon.watch(t, name="all", tokens="all")
    mon.watch(t, name="cls", tokens="cls")
    mon.watch(conv, name="conv")
    x = torch.randn(10, 8)
    s(x)
    t(x)
    conv(torch.randn(5, 3, 8, 8))
    snap = mon.publish()
    assert snap.get("embedding_dim", "dict") == 8 and snap.get("window_samples", "dict") == 10
    assert snap.get("window_samples", "all") == 40 and snap.get("embedding_dim", "all") == 2
    assert snap.get("embedding_dim", "mean") == 2 and snap.get("window_samples", "cls") == 10
    assert snap.get("embedding_dim", "conv") == 6 and snap.get("window_samples", "conv") == 5
    # the dict stream saw x*2: same rank as x
    assert snap.get("effective_rank", "dict") == pytest.approx(float(F.rankme(x)), rel=1e-6)
    assert snap.errors == {}
    mon.close()


def test_subsampling_caps_rows_per_batch() -> None:
    mon = Monitor(port=None, max_rows=32, window=1024)
    mon.observe("z", torch.randn(500, 4))
    assert mon.publish().get("window_samples") == 32


def test_errors_inside_repwatch_are_counted_not_raised() -> None:
    mon = Monitor(port=None, window=512, max_rows=256)
    layer = nn.Linear(4, 4)

    def bad_select(out: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    cap = mon.watch(layer, name="bad", select=bad_select)
    out = layer(torch.randn(3, 4))            # training goes on
    layer(torch.randn(3, 4))                  # hook switched off after the unexpected error
    assert out.shape == (3, 4) and not cap.enabled
    mon.observe("z", "not a tensor")          # type: ignore[arg-type]
    mon.observe("z", torch.randn(5, 3))
    mon.observe("z", torch.randn(5, 7))       # dimension change: rejected, stream kept
    mon.observe("z", torch.randn(5, 3))

    def bad_callback(alert: object) -> None:
        raise RuntimeError("callback bug")

    mon.on_alert(bad_callback)
    mon.observe("c", torch.ones(256, 4))       # collapsed: fires the collapse alert
    for _ in range(3):
        mon.step()
        mon.publish()
    snap = mon.latest
    assert snap is not None
    assert snap.errors == {"capture": 1, "observe": 2, "callback": 1}
    assert snap.get("window_samples", "z") == 10
    mon.close()


def test_strict_mode_raises() -> None:
    mon = Monitor(port=None, strict=True)
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        mon.observe("z", [1.0, 2.0])  # type: ignore[arg-type]


def test_hooks_return_none() -> None:
    mon = Monitor(port=None)
    layer = nn.Linear(3, 3)
    cap = mon.watch(layer, name="l")
    assert cap(layer, (torch.randn(2, 3),), torch.randn(2, 3)) is None


def test_state_dict_roundtrip_and_peak() -> None:
    gen = torch.Generator().manual_seed(6)
    a = Monitor(port=None, window=128, max_rows=64, every=2, peak_warmup=0)
    for _ in range(6):
        a.observe("z", torch.randn(64, 8, generator=gen))
        a.step()
    state = a.state_dict()
    b = Monitor(port=None, window=128, max_rows=64, every=2, peak_warmup=0)
    b.load_state_dict(state)
    nxt = torch.randn(64, 8, generator=gen)
    a.observe("z", nxt)
    b.observe("z", nxt)
    sa, sb = a.publish(), b.publish()
    assert math.isfinite(sb.get("effective_rank_peak", stream="z"))
    assert sb.step == 6 and sa.streams.keys() == sb.streams.keys()
    for key, value in sa.streams["z"].items():
        assert value == sb.streams["z"][key] or (math.isnan(value) and math.isnan(sb.streams["z"][key]))
    with pytest.raises(ValueError, match="window"):
        Monitor(port=None, window=256, max_rows=64).load_state_dict(state)


def _low_rank_after_high(peak_warmup: int) -> Snapshot:
    """Isotropic rows for 10 steps (like a random init), then rank-4 rows for 10 steps."""
    gen = torch.Generator().manual_seed(8)
    mon = Monitor(port=None, window=128, max_rows=128, every=1, peak_warmup=peak_warmup)
    basis = torch.randn(4, 32, generator=gen)
    for step in range(20):
        z = torch.randn(128, 32, generator=gen)
        mon.observe("z", z if step < 10 else torch.randn(128, 4, generator=gen) @ basis)
        mon.step()
    assert mon.latest is not None
    return mon.latest


def test_peak_is_not_taken_during_warmup() -> None:
    early = _low_rank_after_high(peak_warmup=0)        # the isotropic phase sets the peak
    warm = _low_rank_after_high(peak_warmup=12)        # the peak only counts from step 12 on
    rank = early.get("effective_rank", stream="z")
    assert rank == pytest.approx(warm.get("effective_rank", stream="z"))
    assert early.get("effective_rank_peak_ratio", stream="z") < 0.3
    assert warm.get("effective_rank_peak_ratio", stream="z") == pytest.approx(1.0, abs=0.05)
    assert early.get("effective_rank_peak", stream="z") > 20 > rank


def test_collapse_alert_fires_and_resolves_through_monitor() -> None:
    gen = torch.Generator().manual_seed(7)
    fired: list[str] = []
    mon = Monitor(port=None, window=512, max_rows=256, every=1)
    mon.on_alert(lambda a: fired.append(f"{a.name}/{a.stream}"))
    for _ in range(4):                                         # healthy: isotropic
        mon.observe("z", torch.randn(256, 32, generator=gen))
        mon.step()
    assert mon.latest is not None and mon.latest.alerts == []
    for _ in range(6):                                         # collapse: one vector
        mon.observe("z", torch.ones(256, 32) + 1e-4 * torch.randn(256, 32, generator=gen))
        mon.step()
    assert "RepwatchRepresentationCollapse/z" in fired
    assert any(a.name == "RepwatchRepresentationCollapse" for a in mon.latest.alerts)
    for _ in range(8):                                         # recovers
        mon.observe("z", torch.randn(256, 32, generator=gen))
        mon.step()
    assert not any(a.name == "RepwatchRepresentationCollapse" for a in mon.latest.alerts)


def test_snapshot_get_errors() -> None:
    snap = Snapshot(run="r", step=1, time=0.0, streams={"a": {"x": 1.0}, "b": {"x": 2.0}})
    with pytest.raises(KeyError, match="several streams"):
        snap.get("x")
    with pytest.raises(KeyError, match="no stream 'c'"):
        snap.get("x", "c")
    assert snap.get("x", "b") == 2.0


def test_a_taken_port_is_a_counted_error_not_a_crash() -> None:
    """Two trainings on one machine with the README's port: the second one trains on without a
    server (logged, counted under ``server``); only ``strict=True`` raises."""
    with Monitor(run="first", port=0) as first:
        port = int(first.url.rsplit(":", 1)[1])
        with Monitor(run="second", port=port) as second:
            assert second.url is None
            second.observe("z", torch.randn(64, 8))
            snap = second.step()
            snap = second.publish()
            assert snap.errors.get("server") == 1
            assert math.isfinite(snap.get("effective_rank", stream="z"))
        with pytest.raises(OSError, match="could not serve"):
            Monitor(run="third", port=port, strict=True)


def test_a_refused_checkpoint_changes_nothing() -> None:
    """Loading is all-or-nothing: a checkpoint of another window size, or one broken inside
    a stream's state, raises and leaves the monitor exactly as it was."""
    gen = torch.Generator().manual_seed(3)
    small = Monitor(port=None, window=64, max_rows=64, every=5)
    for _ in range(20):
        small.observe("z", torch.randn(32, 8, generator=gen))
        small.step()
    mon = Monitor(port=None, window=128, max_rows=64, every=5)
    for _ in range(3):
        mon.observe("z", torch.randn(32, 8, generator=gen))
        mon.step()
    before = mon.publish()
    with pytest.raises(ValueError, match="window"):
        mon.load_state_dict(small.state_dict())
    assert mon.step_count == 3
    good = mon.state_dict()
    broken = {**good, "step": 50, "engine": {**good["engine"], "streams": {
        "z": {**good["engine"]["streams"]["z"], "moments": {"s": torch.zeros(3, 3)}}}}}
    with pytest.raises(Exception):
        mon.load_state_dict(broken)
    assert mon.step_count == 3
    after = mon.publish()
    for key, value in before.streams["z"].items():
        assert value == after.streams["z"][key] or (math.isnan(value) and math.isnan(after.streams["z"][key])), key


class _ListSink:
    """A sink object that keeps what it is given."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    def submit(self, stream: str, rows: torch.Tensor, labels: torch.Tensor | None,
               step: int) -> None:
        self.sent.append((stream, rows.shape[0]))

    def counts(self) -> dict[str, int]:
        return {}

    def close(self, timeout: float = 5.0) -> None:
        pass


def test_sidecar_mode_opens_no_local_server_unless_asked() -> None:
    """With ``sink=`` the metrics live on the sidecar, whose port the default 9400 is: no local
    server by default; an explicit ``port=`` still serves."""
    with Monitor(run="a", sink=_ListSink()) as mon:
        assert mon.url is None
        mon.observe("z", torch.randn(4, 3))
        assert mon.sink.sent == [("z", 4)]
    with Monitor(run="b", sink=_ListSink(), port=0) as mon:
        assert mon.url is not None
    with Monitor(run="c", port=None) as mon:
        assert mon.url is None

"""A run's history read back (monitor/history.py, Snapshot.from_dict): the JSONL log that
``Monitor(log_path=...)`` writes, snapshot by snapshot, as a pandas frame and as alert episodes.

:func:`write_log` (a tiny real Monitor writing a log, healthy and then collapsing) is shared with
tests/cli/test_report.py and tests/e2e/test_report_page.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from monitor import history
from monitor.history import HistoryError
from monitor.snapshot import Alert, Histogram, SignalKey, Snapshot

COLLAPSE = "RepwatchRepresentationCollapse"


def write_log(path: Path, *, run: str = "exp", steps: int = 40, collapse_at: int | None = 20,
              every: int = 2, seed: int = 0) -> list[Snapshot]:
    """Train nothing: feed a tiny in-process Monitor (no server) isotropic rows on stream
    ``z`` and a small ReLU net's activations for ``steps`` steps, rows of rank 1 from
    ``collapse_at`` on (the collapse alert fires), logging every publish to ``path``. Returns
    the Monitor's own snapshots (its history)."""
    import torch
    from torch import nn

    from monitor import Monitor

    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    mon = Monitor(run=run, port=None, window=512, max_rows=256, every=every, log_path=path)
    try:
        mon.watch_activations(net)
        for i in range(steps):
            with torch.no_grad():
                net(torch.randn(64, 8, generator=gen))
            if collapse_at is not None and i >= collapse_at:
                z = torch.ones(256, 32) + 1e-4 * torch.randn(256, 32, generator=gen)
            else:
                z = torch.randn(256, 32, generator=gen)
            mon.observe("z", z)
            mon.step()
        return list(mon.history)
    finally:
        mon.close()


def _same(a: Any, b: Any, where: str = "") -> None:
    """``a`` and ``b`` equal, NaN equal to NaN, dict keys of the same type."""
    if isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for (ka, va), kb in zip(a.items(), b, strict=True):
            assert type(ka) is type(kb), f"{where}: key {ka!r} is {type(kb).__name__}"
            _same(va, b[kb], f"{where}.{ka}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            _same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} != {b!r}"


def _full_snapshot() -> Snapshot:
    """Every field of a Snapshot set, labelled keys, NaN values, alerts and histograms."""
    tau = SignalKey.of("dormant_units_ratio", tau=0.1)
    sparsity = SignalKey.of("earlybird_mask_distance", sparsity=0.5)
    return Snapshot(
        run="exp", step=120, time=1_700_000_000.25, rank=1, resumed_from=200,
        streams={"z": {SignalKey("effective_rank"): 3.5, SignalKey("low_quality_samples_ratio"): math.nan,
                       SignalKey("window_samples"): 512.0}},
        layers={"fc1": {tau: 0.25, SignalKey.of("dormant_units_ratio", tau=0.0): 0.0,
                        SignalKey("effective_rank"): math.nan}},
        params={"fc1.weight": {SignalKey("weight_norm"): 2.0, SignalKey("weight_rank"): 7}},
        run_signals={sparsity: 0.05, SignalKey("hessian_top_eigenvalue"): math.nan},
        counters={"z": {SignalKey("samples"): 4096.0, SignalKey("nonfinite_values"): 3.0}},
        spectra={"z": [4.0, 1.0, 0.5, 0.0]},
        histograms={SignalKey("qscore"): {"z": Histogram([0.1, 1.0, math.inf], [1.0, 5.0, 9.0], 4.5, 9.0)}},
        dropped={"full": 2.0},
        alerts=[Alert(name=COLLAPSE, stream="z", severity="critical", value=0.01,
                      signal="embedding_std_ratio", summary="s", description="d",
                      runbook_url="docs/runbooks.md#x", run="exp", since_step=100),
                Alert(name="RepwatchPlasticityLoss", stream="fc1", severity="warning",
                      value=0.4, signal=str(tau), summary="s2", description="d2",
                      runbook_url="", run="exp", since_step=110, scope="layer")],
        errors={"capture": 1},
        publish_duration_seconds=0.003, overhead_ratio=math.nan, effective_cadence_steps=2.0,
    )


def test_from_dict_inverts_to_dict_for_every_field() -> None:
    snap = _full_snapshot()
    for spectra in (False, True):
        text = json.dumps(snap.to_dict(spectra=spectra))
        back = Snapshot.from_dict(json.loads(text))
        assert json.dumps(back.to_dict(spectra=spectra)) == text
    # field by field: NaN written as null comes back NaN, keys come back typed
    _same(dataclasses.asdict(back), dataclasses.asdict(snap))
    key = next(iter(back.layers["fc1"]))
    assert type(key) is SignalKey and (key.signal, key.labels) == ("dormant_units_ratio", (("tau", "0.1"),))
    assert back.get("dormant_units_ratio", layer="fc1", tau=0.1) == 0.25
    assert back.run_signals[SignalKey.of("earlybird_mask_distance", sparsity=0.5)] == 0.05
    assert back.alerts == snap.alerts and type(back.alerts[1].signal) is str
    assert back.histograms["qscore"]["z"] == snap.histograms["qscore"]["z"]
    assert back.spectra == {"z": [4.0, 1.0, 0.5, 0.0]} and back.rank == 1 and back.resumed_from == 200
    assert math.isnan(back.overhead_ratio) and math.isnan(back.get("low_quality_samples_ratio", "z"))
    assert back.get("samples", "z") == 4096.0


def test_from_dict_defaults_and_errors() -> None:
    old = Snapshot.from_dict({"run": "r", "step": 3, "time": 1.0, "future_field": [1]})
    assert (old.streams, old.alerts, old.rank, old.spectra) == ({}, [], None, {})
    assert math.isnan(old.overhead_ratio)
    with pytest.raises(ValueError, match="'step'"):
        Snapshot.from_dict({"run": "r", "time": 1.0})
    with pytest.raises(ValueError, match="step must be an integer"):
        Snapshot.from_dict({"run": "r", "step": "3", "time": 1.0})
    with pytest.raises(ValueError, match="streams must be an object"):
        Snapshot.from_dict({"run": "r", "step": 3, "time": 1.0, "streams": [1]})
    with pytest.raises(ValueError, match="expected a number"):
        Snapshot.from_dict({"run": "r", "step": 3, "time": 1.0, "streams": {"z": {"x": "1"}}})
    with pytest.raises(ValueError, match="alert without 'stream', 'severity'"):
        Snapshot.from_dict({"run": "r", "step": 3, "time": 1.0, "alerts": [{"name": "A"}]})
    with pytest.raises(ValueError, match="JSON object"):
        Snapshot.from_dict([1, 2])  # type: ignore[arg-type]


def test_a_monitor_log_reads_back_as_its_snapshots(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    live = write_log(path)
    snaps = history.read(path)
    assert [s.step for s in snaps] == [s.step for s in live] == list(range(2, 41, 2))
    for mine, theirs in zip(snaps, live, strict=True):
        assert json.dumps(mine.to_dict()) == json.dumps(theirs.to_dict())
    assert any(a.name == COLLAPSE and a.stream == "z" for a in snaps[-1].alerts)
    layer = next(iter(snaps[-1].layers))
    assert snaps[-1].get("dormant_units_ratio", layer=layer, tau=0.1) == \
        live[-1].get("dormant_units_ratio", layer=layer, tau=0.1)
    assert all(type(k) is SignalKey for s in snaps for v in s.layers.values() for k in v)
    episodes = history.alert_episodes(snaps)
    collapse = [e for e in episodes if e.alert.name == COLLAPSE]
    assert len(collapse) == 1 and collapse[0].resolved_step is None
    assert collapse[0].first_step == collapse[0].alert.since_step > 20


def _lines(n: int) -> list[str]:
    return [json.dumps(Snapshot(run="r", step=i, time=float(i), streams={"z": {"x": float(i)}})
                       .to_dict()) for i in range(1, n + 1)]


def test_read_skips_a_line_being_written_and_names_bad_lines(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = _lines(3)
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(lines) + "\n" + lines[0][:25])          # a write in progress
    assert [s.step for s in history.read(path)] == [1, 2, 3]
    with pytest.raises(HistoryError, match=r"log\.jsonl:4: .*invalid JSON"):
        history.read(path, on_truncated="raise")
    path.write_text("\n".join(lines))                                  # complete, no newline
    assert [s.step for s in history.read(path)] == [1, 2, 3]
    cut_utf8 = lines[0].replace('"r"', '"é"').encode()[:-1] + b"\xc3"  # cut inside a character
    path.write_bytes(("\n".join(lines) + "\n").encode() + cut_utf8)
    assert len(history.read(path)) == 3
    # a bad line elsewhere (a crash mid-write, then a restart appended) is an error ...
    path.write_text(lines[0] + "\n" + lines[1][:30] + lines[2] + "\n\n" + lines[2] + "\n")
    with pytest.raises(HistoryError, match=r"log\.jsonl:2: not a repwatch snapshot line") as info:
        history.read(path)
    assert info.value.line == 2
    # ... unless asked to skip it (with a warning); blank lines are skipped
    with caplog.at_level(logging.WARNING, logger="repwatch"):
        assert [s.step for s in history.read(path, skip_malformed=True)] == [1, 3]
    assert "log.jsonl:2" in caplog.text
    # a complete last line that is JSON but no snapshot is not a write in progress
    path.write_text(lines[0] + "\n" + '{"run": "r"}')
    with pytest.raises(HistoryError, match=r":2: .*without 'step'"):
        history.read(path)
    path.write_text(lines[0] + "\nnot json\n")
    with pytest.raises(HistoryError, match=r":2: .*invalid JSON"):
        history.read(path)
    path.write_text("")
    assert history.read(path) == []


def _snap(step: int, run: str = "r", rank: int | None = None, alerts: tuple[Alert, ...] = (),
          resumed_from: int | None = None) -> Snapshot:
    return Snapshot(run=run, step=step, time=float(step), rank=rank, alerts=list(alerts),
                    resumed_from=resumed_from, streams={"z": {"x": float(step)}})


def test_timeline_drops_the_abandoned_branch_of_a_resume() -> None:
    written = [_snap(10), _snap(20), _snap(30), _snap(10, run="other"), _snap(40),
               _snap(25, resumed_from=40), _snap(30), _snap(30)]
    line = history.timeline(written)
    assert [(s.run, s.step) for s in line] == [("r", 10), ("r", 20), ("other", 10), ("r", 25),
                                               ("r", 30)]
    assert line[-1] is written[-1]                       # a second publish at a step wins
    groups = history.by_run([_snap(1), _snap(1, rank=1), _snap(2)])
    assert {k: [s.step for s in v] for k, v in groups.items()} == {("r", None): [1, 2],
                                                                  ("r", 1): [1]}


def test_alert_episodes() -> None:
    def alert(name: str, since: int) -> Alert:
        return Alert(name=name, stream="z", severity="critical", value=0.0, signal="x",
                     summary="", description="", runbook_url="", run="r", since_step=since)

    a, b, a2 = alert("A", 20), alert("B", 30), alert("A", 60)
    snaps = [_snap(10), _snap(20, alerts=(a,)), _snap(30, alerts=(a, b)), _snap(40, alerts=(b,)),
             _snap(50), _snap(60, alerts=(a2,))]
    eps = [(e.alert.name, e.first_step, e.last_step, e.resolved_step)
           for e in history.alert_episodes(snaps)]
    assert eps == [("A", 20, 30, 40), ("B", 30, 40, 50), ("A", 60, 60, None)]


def test_to_frame_is_long_format(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    snap = _full_snapshot()
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps(snap.to_dict()) + "\n" +
                    json.dumps(dataclasses.replace(snap, step=130).to_dict()) + "\n")
    df = history.to_frame(history.read(path))
    assert list(df.columns) == list(history.FRAME_COLUMNS)
    assert str(df["step"].dtype) == "int64" and str(df["value"].dtype) == "float64"
    assert str(df["rank"].dtype) == "Int64"
    per_snapshot = 3 + 2 + 3 + 2 + 2       # streams + counters, layers, params, run signals
    assert len(df) == 2 * per_snapshot
    row = df[(df.step == 130) & (df.entity == "fc1") & (df.signal == "dormant_units_ratio{tau=0.1}")]
    assert row.scope.tolist() == ["layer"] and row.value.tolist() == [0.25]
    assert df[(df.signal == "samples")].scope.unique().tolist() == ["stream"]
    assert df[df.scope == "run"].entity.unique().tolist() == ["model"]
    assert df[(df.signal == "low_quality_samples_ratio")].value.isna().all()
    wide = df.pivot_table(index=["run", "step"], columns=["entity", "signal"], values="value")
    assert wide[("z", "effective_rank")].tolist() == [3.5, 3.5]
    assert history.to_frame([]).columns.tolist() == list(history.FRAME_COLUMNS)
    assert isinstance(df, pd.DataFrame)


def test_to_frame_without_pandas_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)          # import pandas → ImportError
    with pytest.raises(ImportError, match="needs pandas.*pip install pandas"):
        history.to_frame([_snap(1)])

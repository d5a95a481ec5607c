"""Sidecar mode brings the sidecar's publishes back to the trainer (issue 19 point 7).

``mon.latest``, ``Snapshot.alerts`` and ``on_alert`` work as with in-process scoring: the
sink's read-back thread (:mod:`monitor.transport.readback`) reads the run's snapshots from the
sidecar's read API, and the Monitor hands each alert the sidecar fired to the callbacks once, in
order, on the training thread.

* End to end, against real sidecars: over HTTP (ONNX Runtime backend) and over a shared-memory
  ring (torch backend, read back from the sidecar's HTTP address given as ``?read=``), a stream
  that collapses to rank 1 after healthy steps fires ``RepwatchRepresentationCollapse`` on the
  sidecar, and the trainer's callback sees it exactly once, in ``step()``.
* Against a scripted read server: dedupe by identity and ``since_step`` (an alert that resolves
  and fires again is delivered again), order, the token on the reads, snapshots ahead of the
  trainer's step ignored, the merge with the local publish, failures counted and never raised.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from torch import nn

from monitor import Monitor
from monitor.errors import ErrorLog
from monitor.server import BackgroundServer
from monitor.sidecar.service import Sidecar, SidecarConfig, create_sidecar_app
from monitor.snapshot import Alert, Snapshot
from monitor.transport import HttpSink, ShmSink, make_sink
from tests.transport.waiting import wait_until as _wait

SHM = Path("/dev/shm")
COLLAPSE = "RepwatchRepresentationCollapse"



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------- end to end

@dataclass
class Seen:
    """What the trainer's ``on_alert`` callback saw: (alert, thread id, step count)."""

    calls: list[tuple[Alert, int, int]] = field(default_factory=list)


def _collapse(mon: Monitor, seen: Seen, *, healthy: int = 20, max_steps: int = 400,
              after: int = 30) -> list[Snapshot]:
    """Train-like loop: healthy rows for ``healthy`` steps, then rows of rank 1, until the
    callback has seen the collapse alert and ``after`` more steps ran (or ``max_steps``).
    Returns the snapshots that ``step()`` returned."""
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=gen)
    published, first = [], None
    for step in range(max_steps):
        if step < healthy:
            z = torch.randn(64, 16, generator=gen)
        else:                                           # every row on one ray: rank 1
            z = (torch.rand(64, 1, generator=gen) + 0.5) * direction
        mon.observe("proj", z)
        snap = mon.step()
        if snap is not None:
            published.append(snap)
        time.sleep(0.01)                                # a step takes time
        if first is None and any(a.name == COLLAPSE for a, _, _ in seen.calls):
            first = step
        if first is not None and step - first >= after:
            break
    return published


def _check_collapse_came_back(mon: Monitor, seen: Seen, published: list[Snapshot],
                              url: str) -> None:
    main = threading.get_ident()
    ids = [(a.name, a.stream, a.since_step) for a, _, _ in seen.calls]
    assert len(ids) == len(set(ids)), ids                # each alert once, though it kept firing
    since = [a.since_step for a, _, _ in seen.calls]
    assert since == sorted(since)                          # in the order the sidecar fired them
    collapse = [(a, thread, step) for a, thread, step in seen.calls if a.name == COLLAPSE]
    assert len(collapse) == 1, ids                          # (RepwatchDimensionalCollapse too)
    alert, thread, step = collapse[0]
    assert all(t == main for _, t, _ in seen.calls)         # in step(), on the training thread
    assert alert.stream == "proj" and alert.scope == "stream" and alert.run == mon.run
    assert 20 < alert.since_step <= step + 1                # after the healthy steps
    # the sidecar kept publishing it; the later local publishes carry it, and mon.latest too
    later = [s for s in published if s.step > step]
    assert later and all(any(a.name == COLLAPSE for a in s.alerts) for s in later)
    latest = mon.latest
    assert latest is not None and any(a.name == COLLAPSE and a.stream == "proj"
                                      for a in latest.alerts)
    assert latest.get("embedding_std_ratio", stream="proj") < 0.1   # the sidecar's values
    runs = httpx.get(f"{url}/v1/runs", timeout=10).json()   # the sidecar says the same
    assert any(a["name"] == COLLAPSE for r in runs if r["run"] == mon.run for a in r["alerts"])


def _monitor(run: str, sink: Any, seen: Seen) -> Monitor:
    mon = Monitor(run=run, every=5, max_rows=64, window=256, port=None, sink=sink)
    mon.on_alert(lambda a: seen.calls.append((a, threading.get_ident(), mon.step_count)))
    return mon


@pytest.mark.e2e
def test_http_sidecar_alert_reaches_on_alert_once() -> None:
    pytest.importorskip("onnxruntime")
    config = SidecarConfig(backend="onnx", every=5, window=256, device="cpu")
    sidecar = Sidecar(config)
    server = BackgroundServer(create_sidecar_app(config, sidecar), "127.0.0.1", 0)
    server.start()
    seen = Seen()
    mon = _monitor("back-http", server.url, seen)
    try:
        published = _collapse(mon, seen)
        _check_collapse_came_back(mon, seen, published, server.url)
        assert mon.sink.readback.counts() == {} and mon.errors.counts() == {}
    finally:
        mon.close()
        server.stop()
        sidecar.close()


@pytest.mark.e2e
@pytest.mark.skipif(not SHM.is_dir(), reason="needs POSIX shared memory (/dev/shm)")
def test_shm_sidecar_alert_reaches_on_alert_once(name: str) -> None:
    from monitor.transport.shm import ShmReader

    config = SidecarConfig(backend="torch", every=5, window=256, device="cpu")
    sidecar = Sidecar(config)
    server = BackgroundServer(create_sidecar_app(config, sidecar), "127.0.0.1", 0)
    server.start()
    reader = ShmReader(f"{name}?slots=16&slot_mb=0.25", sidecar).start()
    seen = Seen()
    mon = None
    try:
        mon = _monitor("back-shm", f"shm://{name}?read={server.url}", seen)
        published = _collapse(mon, seen)
        _check_collapse_came_back(mon, seen, published, server.url)
        assert mon.sink.readback.counts() == {} and mon.errors.counts() == {}
    finally:
        if mon is not None:
            mon.close()
        reader.stop()
        server.stop()
        sidecar.close()


# ---------------------------------------------------------------------------------- scripted

@dataclass
class ReadServer:
    """A stand-in sidecar: takes batches (202) and serves ``history`` (snapshot dicts, oldest
    first) as the read API does; ``answer`` overrides the history answer (status, body)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    answer: tuple[int, str] | None = None
    auth: list[str | None] = field(default_factory=list)
    queries: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""


def _read_app(srv: ReadServer) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/runs/{run}/streams/{stream}/batches")
    async def batches(run: str, stream: str, request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"run": run}, status_code=202)

    @app.get("/v1/runs/{run}/history")
    def history(run: str, request: Request) -> Response:
        with srv.lock:
            srv.auth.append(request.headers.get("authorization"))
            srv.queries.append(dict(request.query_params))
            if srv.answer is not None:
                return Response(srv.answer[1], status_code=srv.answer[0],
                                media_type="application/json")
            since = request.query_params.get("since_step")
            limit = int(request.query_params.get("limit", 200))
            snaps = [s for s in srv.history if s["run"] == run
                     and (since is None or s["step"] > int(since))][-limit:]
        if not snaps and not any(s["run"] == run for s in srv.history):
            return JSONResponse({"detail": "no run"}, status_code=404)
        return JSONResponse(snaps)

    return app


@pytest.fixture
def read_server() -> Iterator[ReadServer]:
    srv = ReadServer()
    server = BackgroundServer(_read_app(srv), "127.0.0.1", 0)
    server.start()
    srv.url = server.url
    try:
        yield srv
    finally:
        server.stop()


def _alert(name: str, since: int, stream: str = "enc", run: str = "r") -> Alert:
    return Alert(name=name, stream=stream, severity="critical", value=0.01,
                 signal="embedding_std_ratio", summary="s", description="d", runbook_url="u",
                 run=run, since_step=since)


def _remote(step: int, *alerts: Alert, run: str = "r") -> dict[str, Any]:
    return Snapshot(run=run, step=step, time=time.time(),
                    streams={"enc": {"effective_rank": float(step), "embedding_std_ratio":
                                     float("nan")}},
                    counters={"enc": {"samples": 64.0 * step}}, run_signals={},
                    alerts=list(alerts), errors={"worker": 1},
                    dropped={"overload": 3.0}).to_dict()


def _stepper(mon: Monitor, layer: nn.Module | None = None
             ) -> Callable[[int], Snapshot | None]:
    """``run(n)``: n training steps (a batch of stream ``enc``, the layer's forward, ``step()``);
    returns the last snapshot that ``step()`` published, if any."""
    x = torch.randn(8, 4)

    def run(n: int) -> Snapshot | None:
        last = None
        for _ in range(n):
            mon.observe("enc", x)
            if layer is not None:
                layer(x)
            last = mon.step() or last
        return last
    return run


def _read(sink: HttpSink, cond: Callable[[], Any], timeout: float = 30.0) -> bool:
    """Wait for ``cond``, asking the read-back for a read now and then (no waiting for its
    backoff)."""
    reader = sink.readback
    assert reader is not None
    return _wait(lambda: (reader.refresh(1.0), cond())[1], timeout)


def test_alerts_once_in_order_on_the_training_thread_with_the_token(
        read_server: ReadServer) -> None:
    srv = read_server
    sink = HttpSink(srv.url, "tok", run="r", read_every=0.05)
    mon = Monitor(run="r", every=5, max_rows=8, window=64, port=None, sink=sink)
    relu = nn.ReLU()
    mon.watch_activations(nn.Sequential(relu))
    calls: list[tuple[str, int, int]] = []
    main = threading.get_ident()
    mon.on_alert(lambda a: calls.append((a.name, a.since_step, threading.get_ident())))
    step = _stepper(mon, relu)
    try:
        step(30)
        assert mon.latest is not None and mon.latest.streams == {}   # nothing read back yet
        with srv.lock:
            srv.history += [_remote(5), _remote(10, _alert("A", 10))]
        assert _read(sink, lambda: sink.readback.snapshots == 2)
        assert calls == []                                # not before the next step()
        step(1)
        assert calls == [("A", 10, main)]
        with srv.lock:                 # A still firing and B fires; A resolves; A fires again
            srv.history += [_remote(15, _alert("A", 10), _alert("B", 15)),
                            _remote(20, _alert("B", 15)),
                            _remote(25, _alert("B", 15), _alert("A", 25)),
                            _remote(10_000, _alert("C", 9_999))]   # ahead of the trainer
        assert _read(sink, lambda: sink.readback.snapshots == 5)
        assert calls == [("A", 10, main)]
        snap = step(4)                                    # steps 32–35: publishes at 35
        assert calls == [("A", 10, main), ("B", 15, main), ("A", 25, main)]
        # the local publish, merged: the sidecar's stream values and alerts, the local layers
        assert snap is not None and snap is mon.latest and snap.step == 35
        assert snap.get("effective_rank", stream="enc") == 25.0
        assert [(a.name, a.since_step) for a in snap.alerts] == [("B", 15), ("A", 25)]
        assert snap.layers                                # scored here
        assert snap.dropped == {} and snap.errors == {}   # the trainer's, not the sidecar's
        assert mon.history[-1] is snap
        step(20)
        assert _read(sink, lambda: True)                  # (one more read after all that)
        step(1)
        assert [c[0] for c in calls] == ["A", "B", "A"]   # C (step 10000) never
        assert mon.latest is not None and mon.latest.step == 55     # the last local publish
        with srv.lock:
            assert set(srv.auth) == {"Bearer tok"}       # the sink's token
            assert srv.queries[-1]["since_step"] == "25"
    finally:
        mon.close()
    assert sink.readback is not None and not sink.readback._thread.is_alive()


def test_a_resume_reads_the_rewound_history(read_server: ReadServer) -> None:
    srv = read_server
    sink = HttpSink(srv.url, run="r", read_every=0.05)
    mon = Monitor(run="r", every=5, max_rows=8, window=64, port=None, sink=sink)
    calls: list[tuple[str, int]] = []
    mon.on_alert(lambda a: calls.append((a.name, a.since_step)))
    step = _stepper(mon)
    try:
        step(30)
        state = mon.state_dict()                          # (the checkpoint of step 30)
        with srv.lock:
            srv.history += [_remote(s) for s in (10, 20, 30)]
        assert _read(sink, lambda: sink.readback.snapshots == 3)
        step(10)
        mon.load_state_dict({**state, "step": 10})         # resumed at step 10
        with srv.lock:                                     # the sidecar rewound its history
            srv.history = [_remote(10), _remote(20, _alert("A", 15))]
        step(10)                                           # the trainer is at 20 again
        assert _wait(lambda: (step(1), sink.readback.refresh(1.0), calls)[2] == [("A", 15)],
                     10), calls
        assert mon.latest is not None and mon.latest.get("effective_rank", stream="enc") == 20
    finally:
        mon.close()


def test_failures_are_counted_and_never_raised(read_server: ReadServer,
                                               caplog: pytest.LogCaptureFixture) -> None:
    srv = read_server
    srv.answer = (200, "not json")
    sink = HttpSink(srv.url, run="r", read_every=0.05)
    mon = Monitor(run="r", every=5, max_rows=8, window=64, port=None, sink=sink)

    def boom(alert: Alert) -> None:
        raise RuntimeError("a callback that fails")

    mon.on_alert(boom)
    step = _stepper(mon)
    try:
        with caplog.at_level(logging.WARNING, logger="repwatch"):
            step(5)
            assert _read(sink, lambda: sink.readback.counts().get("invalid", 0) >= 2)
            assert mon.errors.counts().get("readback", 0) >= 2      # repwatch_errors_total
            srv.answer = (200, json.dumps({"not": "a list"}))
            n = sink.readback.counts()["invalid"]
            assert _read(sink, lambda: sink.readback.counts()["invalid"] > n)
            srv.answer = (503, "worker stopped")
            assert _read(sink, lambda: sink.readback.counts().get("sidecar_error", 0) >= 2)
            srv.answer = (401, "no token")
            assert _read(sink, lambda: sink.readback.counts().get("rejected", 0) >= 2)
            srv.answer = None
            with srv.lock:
                srv.history = [_remote(5, _alert("A", 5))]
            assert _read(sink, lambda: sink.readback.snapshots == 1)
            step(1)                                                 # the callback raises...
            assert mon.errors.counts().get("callback") == 1         # ...counted, training goes on
            step(4)
        assert set(sink.readback.counts()) <= {"invalid", "sidecar_error", "rejected"}
        cannot = [r for r in caplog.records if "cannot read" in r.getMessage()]
        assert len(cannot) == 2                                     # once per reason (5xx, 4xx)
    finally:
        mon.close()
    # a sidecar that is not there: counted as sidecar_down, step() does not wait
    sink = HttpSink(f"http://127.0.0.1:{_free_port()}", run="r", read_every=0.05,
                    backoff=(0.05, 0.1))
    mon = Monitor(run="r", every=5, max_rows=8, window=64, port=None, sink=sink)
    try:
        t0 = time.perf_counter()
        _stepper(mon)(20)
        assert time.perf_counter() - t0 < 5
        assert _read(sink, lambda: sink.readback.counts().get("sidecar_down", 0) >= 1)
        assert mon.publish().alerts == []
    finally:
        mon.close()


def test_merge_keeps_the_local_parts() -> None:
    from monitor.engine.paths import SinkScoring

    class FakeSink:
        def counts(self) -> dict[str, int]:
            return {"queue_full": 2}

    path = SinkScoring(FakeSink(), None, ErrorLog())  # type: ignore[arg-type]
    remote = Snapshot.from_dict(_remote(10, _alert("A", 5)))
    local = Snapshot(run="r", step=12, time=0.0, layers={"relu": {"dead": 0.5}},
                     params={"w": {"weight_norm": 2.0}}, run_signals={"earlybird": 1.0},
                     alerts=[_alert("P", 10, stream="relu")], dropped={"queue_full": 2.0},
                     errors={"hook": 1}, overhead_ratio=0.01)
    merged = path.merged(remote, local)
    assert merged is not None
    assert (merged.step, merged.streams, merged.counters) == (12, remote.streams,
                                                              remote.counters)
    assert (merged.layers, merged.params, merged.run_signals) == (local.layers, local.params,
                                                                  local.run_signals)
    assert [a.name for a in merged.alerts] == ["A", "P"]
    assert (merged.dropped, merged.errors, merged.overhead_ratio) == ({"queue_full": 2.0},
                                                                      {"hook": 1}, 0.01)
    early = path.merged(remote, None)                 # before the first local publish
    assert early is not None and early.dropped == {"queue_full": 2.0} and early.errors == {}
    assert path.merged(None, local) is local


# ---------------------------------------------------------------------------------- options

def test_shm_sink_read_option(name: str, caplog: pytest.LogCaptureFixture) -> None:
    sink = make_sink(f"shm://{name}?slots=8&read=http://127.0.0.1:9", token=None, run="r")
    try:
        assert isinstance(sink, ShmSink) and sink.spec.slots == 8
        assert sink.readback is not None and sink.readback.url == "http://127.0.0.1:9"
    finally:
        sink.close(0)
    sink = make_sink(f"shm://{name}?read=http://127.0.0.1:9", token="t", run="r")  # reads
    sink.close(0)
    with pytest.raises(ValueError, match="guarded by the permissions"):
        make_sink(f"shm://{name}", token="t", run="r")
    with pytest.raises(ValueError, match="read= must be"):
        ShmSink(f"shm://{name}?read=127.0.0.1:9", run="r")
    with pytest.raises(ValueError, match="2 times"):
        ShmSink(f"shm://{name}?read=http://a:1&read=http://b:2", run="r")
    with pytest.raises(ValueError, match="read_every"):
        HttpSink("http://127.0.0.1:9", run="r", read_every=0)
    off = HttpSink("http://127.0.0.1:9", run="r", read_every=None)
    assert off.readback is None
    off.close(0)
    # without read=, on_alert cannot work: said once, not raised
    with caplog.at_level(logging.WARNING, logger="repwatch"):
        mon = Monitor(run="r", every=5, port=None, sink=f"shm://{name}")
        try:
            mon.on_alert(lambda a: None)
            _stepper(mon)(3)
        finally:
            mon.close()
    said = [r for r in caplog.records if "read=http://HOST:PORT" in r.getMessage()]
    assert len(said) == 1

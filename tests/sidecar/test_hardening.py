"""The sidecar against clients that misbehave: bodies withheld or dripped (a real uvicorn on
loopback), raw bodies longer than their shape, what a 409 tells, token file permissions."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from monitor.server import BackgroundServer
from monitor.sidecar import cli as sidecar_cli
from monitor.sidecar.service import BatchHandler, Sidecar, SidecarConfig, create_sidecar_app
from monitor.snapshot import Snapshot
from monitor.transport.errors import Rejected
from monitor.transport.wire import encode_batch
from tests.server.sockets import close_all, connect, request_head, still_open

PATH = "/v1/runs/r/streams/s/batches"


class Recorder:
    """A backend that keeps the shapes it is fed."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []

    def ingest(self, run: str, stream: str, rows: np.ndarray, labels: np.ndarray | None,
               step: int | None) -> None:
        self.shapes.append(rows.shape)

    def snapshots(self) -> list[Snapshot]:
        return []

    def history(self, run: str) -> list[Snapshot] | None:
        return None

    def close(self) -> None:
        pass


def _rows(b: int = 4, d: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((b, d)).astype(np.float32)


Serve = Callable[..., tuple[BackgroundServer, Sidecar]]


@pytest.fixture
def served() -> Iterator[Serve]:
    """``serve(**config)`` → (a real uvicorn on a free loopback port, its Sidecar); stopped."""
    started: list[tuple[BackgroundServer, Sidecar]] = []

    def serve(**kw: Any) -> tuple[BackgroundServer, Sidecar]:
        config = SidecarConfig(**{"every": 1, "window": 64, **kw})
        sc = Sidecar(config, Recorder())
        server = BackgroundServer(create_sidecar_app(config, sc), "127.0.0.1", 0)
        server.start()
        started.append((server, sc))
        return server, sc

    yield serve
    for server, sc in started:
        server.stop()
        sc.close()


def _head(b: int = 4, d: int = 2, **extra: str) -> bytes:
    headers, body = encode_batch(_rows(b, d))
    return request_head("POST", PATH, {**headers, "Content-Length": str(len(body)), **extra})


# ---------------------------------------------------------------------- A: withheld bodies

def test_withheld_bodies_do_not_block_other_clients(served: Serve) -> None:
    """Four clients send a batch's headers and then nothing, as many as the queue has places:
    another client's batch is still queued (202) at once, not answered 429."""
    server, sc = served(queue_batches=4)
    stalled = [connect(server.port, _head()) for _ in range(4)]
    try:
        time.sleep(0.3)                            # the server has read every head
        headers, body = encode_batch(_rows())
        t0 = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=5) as http:
            codes = [http.post(PATH, headers=headers, content=body).status_code
                     for _ in range(3)]
        assert codes == [202, 202, 202]
        assert time.monotonic() - t0 < 3
        assert sc.wait_idle(10) and sc.accounting()["rejected"] == {}
    finally:
        close_all(stalled)


def test_a_body_not_sent_in_time_is_408_and_the_connection_closed(served: Serve) -> None:
    """A body that does not arrive within ``body_timeout_seconds`` — none of it, or dripped
    byte by byte — is answered 408 (counted) and its connection closed."""
    server, sc = served(queue_batches=4, body_timeout_seconds=0.5)
    silent = connect(server.port, _head())
    dripping = connect(server.port, _head(64, 8))              # needs 2048 bytes
    stop = threading.Event()

    def drip() -> None:
        for _ in range(40):                                    # at most 2 s, 40 bytes
            if stop.wait(0.05):
                return
            try:
                dripping.sendall(b"\0")
            except OSError:                                    # the server closed it
                return

    t = threading.Thread(target=drip, daemon=True)
    t0 = time.monotonic()
    t.start()
    try:
        pending, got = still_open([silent, dripping], within=5)
        elapsed = time.monotonic() - t0
        assert not pending, "the server kept a withheld body's connection open"
        for s in (silent, dripping):
            assert got[s].startswith(b"HTTP/1.1 408 "), got[s][:200]
            assert b"not received within 0.5 s" in got[s]
        assert 0.4 < elapsed < 4
        assert sc.accounting()["rejected"] == {"timeout": 2}
        assert sum(sc.accounting()["received"].values()) == 0
    finally:
        stop.set()
        t.join(5)
        close_all([silent, dripping])


def test_config_checks_the_new_limits() -> None:
    for name in ("body_timeout_seconds", "header_timeout_seconds", "keep_alive_seconds"):
        for bad in (0, -1, True, "5", 1e9):
            with pytest.raises(ValueError, match=name):
                SidecarConfig(**{name: bad})
    with pytest.raises(ValueError, match="max_connections"):
        SidecarConfig(max_connections=0)
    from monitor.server import app as server_app              # one set of defaults for both

    d = SidecarConfig()
    assert (d.header_timeout_seconds, d.keep_alive_seconds, d.max_connections) == (
        server_app.HEADER_TIMEOUT_SECONDS, server_app.KEEP_ALIVE_SECONDS,
        server_app.MAX_CONNECTIONS)


# ---------------------------------------------------------------------- C: raw body size

async def _chunks(parts: list[bytes], pulled: list[int]) -> AsyncIterator[bytes]:
    for part in parts:
        pulled.append(len(part))
        yield part


def _ingest(handler: BatchHandler, headers: dict[str, str],
            parts: list[bytes]) -> tuple[Rejected | tuple[int, int | None], list[int]]:
    pulled: list[int] = []

    async def go() -> Any:
        try:
            return await handler.ingest("r", "s", headers, _chunks(parts, pulled))
        except Rejected as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(1) as pool:   # no event loop of the caller's
        return pool.submit(asyncio.run, go()).result(60), pulled


def test_a_raw_body_longer_than_its_shape_is_refused_as_soon_as_it_is() -> None:
    """The raw form's size is known from its shape: a streamed body is refused as soon as it
    passes that size (not read on up to ``max_body_bytes``)."""
    config = SidecarConfig(every=1, window=64)
    sc = Sidecar(config, Recorder())
    try:
        handler = BatchHandler(sc, config)
        headers, body = encode_batch(_rows(4, 2))                  # 32 bytes
        junk = [b"\0" * 4096] * 64                                 # 256 KiB more, if read
        got, pulled = _ingest(handler, headers, [body + b"x", *junk])
        assert isinstance(got, Rejected) and got.status in (400, 413)
        assert "must be 32 bytes" in got.message and "(4×2 float32 rows)" in got.message
        assert pulled == [33]                                      # nothing after the excess
        got, pulled = _ingest(handler, headers, [body[:20], body[20:], b"x", *junk])
        assert isinstance(got, Rejected) and pulled == [20, 12, 1]
        assert _ingest(handler, headers, [body[:5], body[5:]])[0] == (4, None)   # exact: taken
    finally:
        sc.close()


def test_a_content_length_that_disagrees_with_the_shape_is_400_before_reading() -> None:
    config = SidecarConfig(every=1, window=64)
    sc = Sidecar(config, Recorder())
    try:
        handler = BatchHandler(sc, config)
        headers, body = encode_batch(_rows(4, 2), labels=np.arange(4))       # 32 + 32 bytes
        for length in (len(body) - 8, len(body) + 1, 1 << 20):
            got, pulled = _ingest(handler, {**headers, "Content-Length": str(length)}, [body])
            assert isinstance(got, Rejected) and got.status == 400, got
            assert pulled == []                                    # refused before the body
            assert (f"Content-Length {length} does not match X-Repwatch-Shape 4,2: the body "
                    "must be 64 bytes (4×2 float32 rows + 4 int64 labels)") in got.message
        assert sc.accounting()["rejected"] == {}                   # counted by the route
        got, _ = _ingest(handler, {**headers, "Content-Length": str(len(body))}, [body])
        assert got == (4, None)
    finally:
        sc.close()


def test_content_length_mismatch_over_http_is_400_and_counted() -> None:
    config = SidecarConfig(every=1, window=64, max_body_bytes=4096)
    sc = Sidecar(config, Recorder())
    try:
        client = TestClient(create_sidecar_app(config, sc))
        headers, body = encode_batch(_rows(4, 2))
        r = client.post(PATH, headers={**headers, "X-Repwatch-Shape": "5,2"}, content=body)
        assert r.status_code == 400
        assert "Content-Length 32 does not match X-Repwatch-Shape 5,2" in r.json()["detail"]
        assert sc.accounting()["rejected"] == {"bad_request": 1}
    finally:
        sc.close()


# ---------------------------------------------------------------------- D: 409 too many runs

def test_too_many_runs_names_no_other_run(caplog: pytest.LogCaptureFixture) -> None:
    config = SidecarConfig(every=1, window=64, max_runs=2)
    sc = Sidecar(config, Recorder())
    try:
        client = TestClient(create_sidecar_app(config, sc))
        headers, body = encode_batch(_rows())
        for run in ("secret-alpha", "secret-beta"):
            url = f"/v1/runs/{run}/streams/s/batches"
            assert client.post(url, headers=headers, content=body).status_code == 202
        with caplog.at_level("INFO", logger="repwatch.sidecar"):
            r = client.post("/v1/runs/intruder/streams/s/batches", headers=headers,
                            content=body)
        assert r.status_code == 409
        detail = r.json()["detail"]
        assert "secret" not in detail
        assert detail == ("too many runs: this service takes at most 2 runs and has 2; got new "
                          "run 'intruder'")
        assert "secret-alpha" in caplog.text                       # the operator sees them
    finally:
        sc.close()


# ---------------------------------------------------------------------- F: token file mode

@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("mode,warned", [(0o644, True), (0o604, True), (0o444, True),
                                         (0o640, False), (0o600, False), (0o400, False)])
def test_a_token_file_others_can_read_is_warned_about(tmp_path: Any, mode: int, warned: bool,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    path.chmod(mode)
    assert sidecar_cli.read_token(str(path)) == "s3cret"
    err = capsys.readouterr().err
    if warned:
        assert (f"warning: token file {str(path)!r} is accessible by every user "
                f"(mode {mode:04o}); restrict it: chmod 600 {path}") in err
    else:
        assert err == ""


# ---------------------------------------------------------------------- CLI

def test_cli_passes_the_connection_limits_to_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(prog="repwatch")
    sidecar_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    seen: list[SidecarConfig] = []
    monkeypatch.setattr(sidecar_cli, "serve", lambda config: seen.append(config) or 0)
    args = parser.parse_args(["serve", "--body-timeout", "12", "--header-timeout", "3",
                              "--keep-alive", "7.5", "--max-connections", "40"])
    assert sidecar_cli.run(args) == 0
    (config,) = seen
    assert (config.body_timeout_seconds, config.header_timeout_seconds,
            config.keep_alive_seconds, config.max_connections) == (12, 3, 7.5, 40)
    defaults = SidecarConfig()
    args = parser.parse_args(["serve"])
    assert sidecar_cli.run(args) == 0
    assert (seen[1].body_timeout_seconds, seen[1].header_timeout_seconds,
            seen[1].keep_alive_seconds, seen[1].max_connections) == (
        defaults.body_timeout_seconds, defaults.header_timeout_seconds,
        defaults.keep_alive_seconds, defaults.max_connections)
    assert sidecar_cli.run(parser.parse_args(["serve", "--body-timeout", "0"])) == 2
    monkeypatch.undo()

    ran: list[Any] = []

    def fake_run(self: uvicorn.Server, sockets: Any = None) -> None:
        ran.append(self.config)
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    assert sidecar_cli.serve(SidecarConfig(port=0, device="cpu", header_timeout_seconds=3,
                                           keep_alive_seconds=7.5, max_connections=40)) == 0
    (uv,) = ran
    uv.load()
    assert (uv.timeout_keep_alive, uv.http_protocol_class.header_timeout,
            uv.http_protocol_class.max_connections) == (7.5, 3, 40)

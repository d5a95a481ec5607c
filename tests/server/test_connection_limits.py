"""The servers' connection limits (a real uvicorn on a free loopback port, always torn down):
request heads not completed in time, idle connections and connections over the cap are closed
by the server, which goes on answering; /docs (a CDN page) is not served."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from monitor.server import BackgroundServer, create_app
from monitor.server.app import server_config
from tests.server.sockets import close_all, connect, request_head, still_open

PROTOCOLS = ["h11"] + (["httptools"] if importlib.util.find_spec("httptools") else [])


@pytest.fixture
def start() -> Iterator[Any]:
    """``start(**limits)`` → a running BackgroundServer over an empty read app; stopped."""
    servers: list[BackgroundServer] = []

    def go(**limits: Any) -> BackgroundServer:
        server = BackgroundServer(create_app(lambda: None, lambda: []), "127.0.0.1", 0,
                                  **limits)
        server.start()
        servers.append(server)
        return server

    yield go
    for server in servers:
        server.stop()


@pytest.mark.parametrize("http", PROTOCOLS)
def test_stalled_and_idle_connections_are_closed_by_the_server(start: Any, http: str) -> None:
    """20 connections that never finish their request head, 20 that send nothing and one that
    idles after a request: all closed by the server within the timeouts; meanwhile and after,
    the server answers."""
    server = start(header_timeout=0.5, keep_alive=0.5, max_connections=100, http=http)
    partial = [connect(server.port, request_head("GET", "/healthz", complete=False))
               for _ in range(20)]
    idle = [connect(server.port) for _ in range(20)]
    kept = connect(server.port, request_head("GET", "/healthz"))
    socks = partial + idle + [kept]
    try:
        t0 = time.monotonic()
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
        pending, got = still_open(socks, within=5)
        elapsed = time.monotonic() - t0
        assert not pending, f"{len(pending)} of {len(socks)} connections still open"
        assert elapsed < 3
        assert got[kept].startswith(b"HTTP/1.1 200 ")            # answered, then timed out
        assert all(got[s] == b"" for s in idle)
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
    finally:
        close_all(socks)


@pytest.mark.parametrize("http", PROTOCOLS)
def test_a_slow_head_after_a_response_is_closed_too(start: Any, http: str) -> None:
    """On a kept-alive connection the next request's head must also be complete in time (the
    keep-alive timer stops at its first byte)."""
    server = start(header_timeout=0.5, keep_alive=30, http=http)
    s = connect(server.port, request_head("GET", "/healthz"))
    try:
        s.settimeout(5)
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")          # and no blank line
        pending, _ = still_open([s], within=3)
        assert not pending
    finally:
        close_all([s])


def test_a_request_slower_than_the_header_timeout_is_not_cut(start: Any) -> None:
    """The header deadline ends with the head: a long request over the same connection is
    answered, and the connection then serves the next one."""
    from monitor.server.app import SingleRunSource, create_read_app

    def slow_latest() -> None:
        time.sleep(1.0)

    app = create_read_app(SingleRunSource(slow_latest, lambda: []))
    server = BackgroundServer(app, "127.0.0.1", 0, header_timeout=0.3, keep_alive=5)
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=5) as http:
            assert http.get("/healthz").status_code == 200          # takes 1 s
            assert http.get("/healthz").status_code == 200          # same connection
    finally:
        server.stop()


@pytest.mark.parametrize("http", PROTOCOLS)
def test_connections_over_the_cap_are_closed_at_once(start: Any, http: str) -> None:
    server = start(header_timeout=2.0, max_connections=10, http=http)
    socks = [connect(server.port) for _ in range(16)]
    try:
        pending, _ = still_open(socks, within=1.0)
        assert len(pending) == 10                                  # the cap; 6 closed at once
        pending, _ = still_open(pending, within=4)                 # then the header timeout
        assert not pending
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
    finally:
        close_all(socks)


def test_server_config_is_built_in_one_place() -> None:
    app = create_app(lambda: None, lambda: [])
    config = server_config(app, "127.0.0.1", 0, header_timeout=2.5, keep_alive=7,
                           max_connections=33, http="h11")
    assert (config.timeout_keep_alive, config.access_log) == (7, False)
    assert config.limit_concurrency == 34            # uvicorn counts the asking connection
    config.load()
    protocol = config.http_protocol_class
    assert (protocol.header_timeout, protocol.max_connections) == (2.5, 33)
    server = BackgroundServer(app, "127.0.0.1", 0)
    assert server.config.limit_concurrency is not None and server.config.timeout_keep_alive > 0
    for bad in ({"header_timeout": 0}, {"keep_alive": -1}, {"max_connections": 0}):
        with pytest.raises(ValueError):
            server_config(app, "127.0.0.1", 0, **bad)


def test_no_page_that_needs_a_cdn() -> None:
    """/docs and /redoc load their scripts from a public CDN: not served (the schema is at
    /openapi.json)."""
    client = TestClient(create_app(lambda: None, lambda: []))
    assert client.get("/docs").status_code == 404
    assert client.get("/redoc").status_code == 404
    assert client.get("/openapi.json").json()["openapi"].startswith("3.")
    for page in ("/", "/runbooks"):
        assert "cdn." not in client.get(page).text


"""The in-process read server on a non-loopback address: a warning through the "repwatch"
logger once at start (it has no authentication), none on loopback."""

from __future__ import annotations

import logging
import socket

import pytest

from monitor import Monitor

WARNING = "without authentication"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "repwatch" and r.levelno == logging.WARNING and WARNING in r.getMessage()]


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("host", ["0.0.0.0", pytest.param("::", marks=pytest.mark.skipif(
    not _has_ipv6(), reason="no IPv6 here"))])
def test_serving_on_all_interfaces_warns_once(host: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="repwatch")
    mon = Monitor(run="exposed", port=0, host=host)
    try:
        assert mon._server is not None, "the server did not start"
        mon.step()
        mon.step()
    finally:
        mon.close()
    records = _warnings(caplog)
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    message = records[0].getMessage()
    assert host in message and "other hosts" in message
    assert "127.0.0.1" in message and "reverse proxy" in message


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_serving_on_loopback_does_not_warn(host: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="repwatch")
    with Monitor(run="local", port=0, host=host) as mon:
        assert mon._server is not None, "the server did not start"
    assert _warnings(caplog) == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_no_server_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="repwatch")
    with Monitor(run="quiet", port=None, host="0.0.0.0"):
        pass
    assert _warnings(caplog) == []


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("LocalHost", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.1", False), ("192.168.1.2", False),
    ("fe80::1", False), ("myhost", False), ("localhost.example.com", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    from monitor.validation import is_loopback

    assert is_loopback(host) is loopback


def test_url_is_none_once_closed() -> None:
    mon = Monitor(run="u", port=0)
    assert mon.url is not None and mon.url.startswith("http://127.0.0.1:")
    mon.close()
    assert mon.url is None

"""The one error path (monitor/errors.py): count, log once, swallow — or re-raise when strict."""

from __future__ import annotations

import logging

import pytest

from monitor.errors import ErrorLog


def test_guard_counts_swallows_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    log = ErrorLog()
    seen: list[Exception] = []
    with caplog.at_level(logging.WARNING, logger="repwatch"):
        for _ in range(3):
            with log.guard("scorer", key="scorer[z]", on_error=seen.append):
                raise RuntimeError("boom")
        with log.guard("scorer", key="scorer[z]"):
            pass                                         # no error: nothing counted
    assert log.counts() == {"scorer": 3}
    assert [str(e) for e in seen] == ["boom"] * 3
    assert sum("scorer[z] failed" in r.getMessage() for r in caplog.records) == 1


def test_guard_reraises_when_strict_after_counting() -> None:
    log = ErrorLog(strict=True)
    with pytest.raises(ValueError, match="bad"), log.guard("observe"):
        raise ValueError("bad")
    assert log.counts() == {"observe": 1}


def test_guard_lets_base_exceptions_through() -> None:
    """KeyboardInterrupt / SystemExit are the user's, not repwatch's errors."""
    log = ErrorLog()
    with pytest.raises(KeyboardInterrupt), log.guard("observe"):
        raise KeyboardInterrupt
    assert log.counts() == {}

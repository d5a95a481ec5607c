"""One rule for run/stream names and integer options, used by every entry point."""

from __future__ import annotations

import pytest

from monitor.validation import NAME_PATTERN, check_int, check_name, is_name


@pytest.mark.parametrize("name", ["a", "run-1", "exp/2024.01:seed_3", "x" * 128])
def test_valid_names(name: str) -> None:
    assert is_name(name) and check_name("run", name) == name


@pytest.mark.parametrize("name", ["", "x" * 129, "a b", "naïve", "a{b}", 'a"b', None, 3])
def test_invalid_names_are_refused_with_the_rule(name: object) -> None:
    assert not is_name(name)
    with pytest.raises(ValueError, match=r"stream must be 1–128 characters .*got"):
        check_name("stream", name)


def test_int_options() -> None:
    assert check_int("every", 3, 1) == 3
    for bad in (0, -1, 1.5, True, "2", None):
        with pytest.raises(ValueError, match=r"every must be an int >= 1, got"):
            check_int("every", bad, 1)
    with pytest.raises(ValueError, match=r"reservoir must be an int >= 2 rows, got 1"):
        check_int("reservoir", 1, 2, unit="rows")


def test_every_entry_point_applies_the_same_name_rule() -> None:
    """The in-process monitor, the HTTP sink and the sidecar's path pattern refuse the same
    names (the sidecar's FastAPI routes use NAME_PATTERN itself)."""
    import re

    from monitor import Monitor
    from monitor.transport import HttpSink

    bad = "run with spaces"
    with pytest.raises(ValueError, match="run must be 1–128"):
        Monitor(run=bad, port=None)
    with pytest.raises(ValueError, match="run must be 1–128"):
        HttpSink("http://127.0.0.1:9", run=bad)
    assert re.match(NAME_PATTERN, bad) is None

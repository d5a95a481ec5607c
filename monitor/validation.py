"""Argument checks shared by every entry point (torch-free, standard library only).

One rule for run and stream names — 1–128 characters of letters, digits and ``_.:/-``, which
are also safe as Prometheus label values and URL path segments — and one for integer options, so
the in-process monitor, the sinks, the shared-memory ring and the sidecar reject the same inputs
with the same messages.
"""

from __future__ import annotations

import re

NAME_PATTERN = r"^[A-Za-z0-9_.:/-]{1,128}$"
"""Run and stream names (also the sidecar's URL path pattern and the label charset)."""

NAME = re.compile(NAME_PATTERN)


def is_name(value: object) -> bool:
    """Whether ``value`` is a valid run or stream name."""
    return isinstance(value, str) and NAME.match(value) is not None


def check_name(kind: str, value: object) -> str:
    """``value`` if it is a valid run/stream name, else a ValueError naming ``kind``."""
    if not is_name(value):
        raise ValueError(f"{kind} must be 1–128 characters of letters, digits and _.:/-, "
                         f"got {value!r}")
    return value  # type: ignore[return-value]


def check_int(kind: str, value: object, low: int, unit: str = "") -> int:
    """``value`` if it is an int (not a bool) ``>= low``, else a ValueError naming ``kind``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{kind} must be an int >= {low}{' ' + unit if unit else ''}, "
                         f"got {value!r}")
    return value

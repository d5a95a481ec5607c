"""Argument checks shared by every entry point (torch-free, standard library only).

One rule for run and stream names — 1–128 characters of letters, digits and ``_.:/-``, which
are also safe as Prometheus label values, and no ``/``-separated segment that a URL path would
normalise away (empty, ``.`` or ``..``: ``/v1/runs/../history`` is not run ``..``'s history) —
and one for integer options, so
the in-process monitor, the sinks, the shared-memory ring and the sidecar reject the same inputs
with the same messages.
"""

from __future__ import annotations

import ipaddress

import re

NAME_PATTERN = r"^[A-Za-z0-9_.:/-]{1,128}$"
"""The charset and length of run and stream names (also the URL path pattern of the read
routes); :func:`is_name` adds the path-segment rule, which a URL pattern cannot express."""

NAME = re.compile(NAME_PATTERN)


def _normalised_away(value: str) -> bool:
    return any(part in ("", ".", "..") for part in value.split("/"))


def is_name(value: object) -> bool:
    """Whether ``value`` is a valid run or stream name."""
    return isinstance(value, str) and NAME.match(value) is not None and not _normalised_away(value)


def check_name(kind: str, value: object) -> str:
    """``value`` if it is a valid run/stream name, else a ValueError naming ``kind``."""
    if isinstance(value, str) and NAME.match(value) is not None:
        if not _normalised_away(value):
            return value
        raise ValueError(f"{kind} must not have an empty, '.' or '..' path segment (a URL "
                         f"would normalise it away), got {value!r}")
    raise ValueError(f"{kind} must be 1–128 characters of letters, digits and _.:/-, "
                     f"got {value!r}")


def check_int(kind: str, value: object, low: int, unit: str = "") -> int:
    """``value`` if it is an int (not a bool) ``>= low``, else a ValueError naming ``kind``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{kind} must be an int >= {low}{' ' + unit if unit else ''}, "
                         f"got {value!r}")
    return value


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ``::1``, IPv4-mapped
    ``::ffff:127.x``); False for any other address or host name (``0.0.0.0``, ``::``, ``""``)."""
    host = host.strip()
    if host.lower() == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback

"""Errors inside repwatch: caught, counted by component, logged once. Training never sees them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger("repwatch")


class ErrorLog:
    """Thread-safe per-component exception counts; the first exception of each is logged.

    ``strict``: :meth:`guard` re-raises after counting (debugging; training sees the error).
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._keys_logged: set[str] = set()

    def record(self, component: str, exc: BaseException, key: str | None = None) -> None:
        """Count ``exc`` under ``component``; log it the first time ``key`` (or the component) fails."""
        key = key or component
        with self._lock:
            self._counts[component] = self._counts.get(component, 0) + 1
            first = key not in self._keys_logged
            self._keys_logged.add(key)
        if first:
            log.warning("repwatch %s failed (training continues; further errors of this kind "
                        "are counted in repwatch_errors_total): %s: %s",
                        key, type(exc).__name__, exc, exc_info=exc)

    def guard(self, component: str, key: str | None = None,
              on_error: Callable[[Exception], None] | None = None) -> Guard:
        """A context manager: an exception in its block is counted under ``component``
        (``on_error`` sees it first) and swallowed, or re-raised when ``strict``. Stateless, so
        a hook builds its guard once and enters it on every call (no per-call allocation)."""
        return Guard(self, component, key, on_error)

    def counts(self) -> dict[str, int]:
        """A copy of the counts."""
        with self._lock:
            return dict(self._counts)

    def load(self, counts: dict[str, int]) -> None:
        """Restore counts (from a checkpoint)."""
        with self._lock:
            self._counts = {str(k): int(v) for k, v in counts.items()}


class Guard:
    """See :meth:`ErrorLog.guard`; ``Exception`` only (KeyboardInterrupt passes through)."""

    __slots__ = ("log", "component", "key", "on_error")

    def __init__(self, log: ErrorLog, component: str, key: str | None,
                 on_error: Callable[[Exception], None] | None) -> None:
        self.log, self.component, self.key, self.on_error = log, component, key, on_error

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if not isinstance(exc, Exception):
            return False
        if self.on_error is not None:
            self.on_error(exc)
        self.log.record(self.component, exc, self.key)
        return not self.log.strict

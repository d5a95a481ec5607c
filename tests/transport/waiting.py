"""Helpers of the transport tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(cond: Callable[[], Any], timeout: float = 30.0) -> bool:
    """Poll ``cond`` every 5 ms until it is true (True) or ``timeout`` s passed (False)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True

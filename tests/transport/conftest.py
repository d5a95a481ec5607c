"""Fixtures of the transport tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SHM = Path("/dev/shm")


@pytest.fixture
def name() -> Iterator[str]:
    """A fresh shared-memory ring name; fails the test when the segment is left behind."""
    n = f"rwtest-{uuid.uuid4().hex[:12]}"
    yield n
    leaked = (SHM / n).exists()
    if leaked:
        os.unlink(SHM / n)
    assert not leaked, f"segment {n} leaked"

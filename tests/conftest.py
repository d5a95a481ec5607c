"""Shared fixtures: CPU threads kept small; helpers for servers on free loopback ports."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def promtool() -> str:
    """Path of promtool; under CI=true a missing promtool fails instead of skipping."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: `make test` installs Debian's prometheus package")
        pytest.skip("promtool not installed (Debian package prometheus); `make test` installs it")
    return path

"""deploy/: the shipped Prometheus config (with its rule file) is valid for promtool."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_prometheus_config_is_valid(promtool: str) -> None:
    proc = subprocess.run([promtool, "check", "config",
                           str(ROOT / "deploy/prometheus/prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr

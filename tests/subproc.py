"""Run a snippet in a fresh interpreter (import-isolation checks: what a module pulls in)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -c code`` from the repository root, output captured as text."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)

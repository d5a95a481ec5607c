"""Run ``repwatch serve`` in a child process with torch unimportable (the sidecar image has no
torch) and wait until it is ready (a test helper, not a test module)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_without_torch(args: list[str], port: int, timeout: float = 60.0) -> Iterator[str]:
    """``repwatch serve <args>`` (which must bind 127.0.0.1:``port``) with ``torch`` blocked;
    yields the base URL once ``/readyz`` answers 200, and always stops the process."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from monitor.cli import main\n"
            f"sys.exit(main(['serve', *{args!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"repwatch serve exited with {proc.returncode}: "
                                     f"{proc.stdout.read() if proc.stdout else ''}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"repwatch serve was not ready within {timeout} s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()

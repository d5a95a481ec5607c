"""Browser fixtures: Debian's Chromium driven by Playwright (nothing downloaded at run time)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM_NAMES: tuple[str, ...] = ("chromium", "chromium-browser")


def _missing(what: str) -> None:
    """Skip, or fail under CI=true (`make test` installs what the browser tests need)."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing: `make test` installs it (Debian chromium via "
                    "`make ops-tools`, playwright via the test extra)")
    pytest.skip(f"{what} not installed; `make test` installs it")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Path of Debian's Chromium (package ``chromium``)."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path is not None:
            return path
    _missing("chromium (Debian package chromium)")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def browser(chromium_path: str) -> Iterator[Any]:
    """A headless Chromium launched by path through Playwright (never `playwright install`)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright (PyPI, the test extra)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path, headless=True,
                               args=["--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()

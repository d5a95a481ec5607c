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


def _binary(names: tuple[str, ...], package: str) -> str:
    """First of ``names`` on PATH; skip when none (fail under CI=true: `make test` installs it)."""
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    if os.environ.get("CI"):
        pytest.fail(f"{' / '.join(names)} missing: `make test` installs Debian's {package} package")
    pytest.skip(f"{' / '.join(names)} not installed (Debian package {package}); `make test` "
                "installs it")


@pytest.fixture(scope="session")
def prometheus() -> str:
    """Path of the Prometheus server binary (Debian package prometheus); session-scoped so that
    module fixtures can start one server for many tests."""
    return _binary(("prometheus",), "prometheus")


@pytest.fixture
def alertmanager() -> str:
    """Path of Alertmanager (Debian names it ``prometheus-alertmanager``)."""
    return _binary(("prometheus-alertmanager", "alertmanager"), "prometheus-alertmanager")


@pytest.fixture(scope="module")
def single_thread():  # type: ignore[no-untyped-def]
    """One BLAS/LAPACK thread (torch and numpy's OpenBLAS) for a module, then restored.

    The matrices in the tests are small; on a 2-core box that other processes also load,
    2-thread spin-waiting made e.g. a 300 × 300 ``eigvalsh`` take 3.5 s instead of 7 ms.
    Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # numpy's BLAS then keeps its default thread count
            yield
        else:
            with threadpool_limits(limits=1):
                yield
    finally:
        torch.set_num_threads(before)

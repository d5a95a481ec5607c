"""Shared fixtures: CPU threads kept small; the shared trainings; the Debian tools' paths.

Threads: ``REPWATCH_TEST_THREADS`` (default 1) for torch, and for the BLAS/OpenMP pools of this
process and of the processes the tests start (their environment). The tests' matrices and
models are small: on a 2-core machine that other processes also load, more threads only spin
(a 300 × 300 ``eigvalsh`` took 3.5 s instead of 7 ms with two). ``REPWATCH_TEST_THREADS=2 make
test`` runs the suite with two.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

THREADS = int(os.environ.get("REPWATCH_TEST_THREADS", "1"))
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, str(THREADS))

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.trained import plasticity_runs, simsiam_collapsed, simsiam_healthy  # noqa: E402, F401

torch.set_num_threads(THREADS)
try:                                      # pools already loaded before the variables were set
    from threadpoolctl import threadpool_limits
except ImportError:
    pass
else:
    threadpool_limits(limits=THREADS)


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


# Modules that take tens of seconds (trainings, stacks of processes), started first under
# pytest-xdist (`make test`: ``-n auto --dist loadscope``, a module on one worker) so that no
# worker is left running one of them alone at the end; the rest follow, most tests first.
SLOW_MODULES_FIRST: tuple[str, ...] = (
    "tests/tools/scenarios/test_plasticity.py", "tests/test_alerting_e2e.py",
    "tests/tools/scenarios/", "tests/tools/test_bench.py", "tests/sidecar/test_end_to_end.py",
    "tests/cli/test_main.py",
    "tests/e2e/", "tests/deploy/", "tests/engine/test_distributed.py", "tests/test_makefile.py",
    "tests/cli/test_watch.py", "tests/test_packaging.py")


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadscope`` with :data:`SLOW_MODULES_FIRST` at the head of the queue."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    def rank(nodeid: str) -> int:
        return next((i for i, prefix in enumerate(SLOW_MODULES_FIRST)
                     if nodeid.startswith(prefix)), len(SLOW_MODULES_FIRST))

    class SlowModulesFirst(LoadScopeScheduling):
        def _assign_work_unit(self, node: Any) -> None:
            first = min(self.workqueue, key=rank)          # the first of the lowest rank
            self.workqueue.move_to_end(first, last=False)
            super()._assign_work_unit(node)

    return SlowModulesFirst(config, log)

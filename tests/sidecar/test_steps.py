"""A run's clock in the sidecar: resumes (a step going back) and bounded forward jumps, the same
in both backends."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from monitor.sidecar.config import SidecarConfig
from monitor.sidecar.service import Sidecar

BACKENDS = ["torch", pytest.param("onnx", marks=pytest.mark.skipif(
    not __import__("importlib").util.find_spec("onnxruntime"), reason="onnxruntime missing"))]


@pytest.fixture(params=BACKENDS)
def sidecar(request: pytest.FixtureRequest) -> Iterator[Sidecar]:
    sc = Sidecar(SidecarConfig(backend=request.param, every=10, window=256, max_step_jump=1000))
    yield sc
    sc.close()


def _send(sc: Sidecar, steps: Any, stream: str = "s") -> None:
    rng = np.random.default_rng(0)
    for step in steps:
        sc.submit("r", stream, rng.standard_normal((8, 6)).astype(np.float32), None, step)
        assert sc.wait_idle(60)                   # one at a time: the queue never fills


def test_a_resume_from_an_earlier_checkpoint_publishes_again(sidecar: Sidecar) -> None:
    _send(sidecar, range(1, 101))
    assert sidecar.snapshots()[0].step == 100
    _send(sidecar, range(50, 91))                 # the trainer resumed at step 50
    latest = sidecar.snapshots()[0]
    assert latest.step == 90
    steps = [s.step for s in sidecar.history("r")]
    assert steps == sorted(steps) and steps[-1] == 90   # what came after step 50 is dropped
    assert 100 not in steps and 60 in steps
    marked = [s for s in sidecar.history("r") if s.resumed_from is not None]
    assert [(s.step, s.resumed_from) for s in marked] == [(60, 100)]
    assert latest.resumed_from is None


def test_a_late_batch_after_the_last_publish_does_not_move_the_clock(sidecar: Sidecar) -> None:
    _send(sidecar, [1, 10, 15, 12, 16, 20])       # 12: late, but after the publish at 10
    assert [s.step for s in sidecar.history("r")] == [10, 20]
    assert all(s.resumed_from is None for s in sidecar.history("r"))


def test_a_huge_forward_jump_is_refused_and_counted(sidecar: Sidecar) -> None:
    _send(sidecar, [1, 10, 2**63 - 1, 15, 20, 30])
    history = sidecar.history("r")
    assert [s.step for s in history] == [10, 20, 30]     # publishing goes on
    assert history[-1].errors.get("step", 0) == 1


def test_the_first_batch_may_start_anywhere(sidecar: Sidecar) -> None:
    _send(sidecar, [5_000_000, 5_000_005, 5_000_010])   # a sidecar restarted mid-run
    assert [s.step for s in sidecar.history("r")][-1] == 5_000_010

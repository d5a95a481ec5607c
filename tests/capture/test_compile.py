"""Hooks under torch.compile: a watched submodule of a compiled model, and a compiled model."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from monitor import Monitor
from tests.toy_training import toy_mlp

pytestmark = pytest.mark.usefixtures("single_thread")

BACKENDS = [                                               # compiling takes seconds
    pytest.param("eager", marks=pytest.mark.slow),
    pytest.param("aot_eager", marks=pytest.mark.slow),
    pytest.param("inductor", marks=[pytest.mark.slow, pytest.mark.skipif(   # compiles C++
        shutil.which("c++") is None and shutil.which("g++") is None,
        reason="inductor on the CPU needs a C++ compiler (none on PATH)")]),
]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def train(compile_kw: dict[str, Any] | None, watch: Callable[[Monitor, nn.Module, nn.Module], None]
          | None, steps: int = 6) -> tuple[list[float], Monitor | None, int]:
    """Seeded SGD on :func:`toy_mlp`, optionally compiled; ``watch(mon, model, compiled)``
    attaches the monitor. Returns losses, the (closed) monitor and Dynamo's graph breaks."""
    from torch._dynamo.utils import counters

    counters.clear()
    torch.manual_seed(0)
    model = toy_mlp()
    compiled = torch.compile(model, **compile_kw) if compile_kw is not None else model
    mon = None
    if watch is not None:
        mon = Monitor(port=None, every=3, max_rows=16, window=128)
        watch(mon, model, compiled)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
        loss = nn.functional.cross_entropy(compiled(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if mon is not None:
            mon.step()
    if mon is not None:
        mon.close()
    return losses, mon, sum(counters["graph_break"].values())


def same(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], rel: float) -> bool:
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(
            (math.isnan(v) and math.isnan(b[k][n])) or math.isclose(v, b[k][n], rel_tol=rel,
                                                                    abs_tol=rel)
            for n, v in a[k].items())
        for k in a)


def watch_inside(mon: Monitor, model: nn.Module, compiled: nn.Module) -> None:
    mon.watch(model[3], name="hidden")          # a submodule inside the compiled graph
    mon.watch_activations(model)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_inside_a_compiled_graph_fire_with_the_same_rows(backend: str) -> None:
    ref_losses, ref, _ = train(None, watch_inside)
    if backend == "inductor":  # dropout from the eager RNG, as in the reference run
        with torch._inductor.config.patch(fallback_random=True):
            losses, mon, breaks = train({"backend": backend, "fullgraph": True}, watch_inside)
    else:
        losses, mon, breaks = train({"backend": backend, "fullgraph": True}, watch_inside)
    assert ref is not None and mon is not None and ref.latest is not None
    assert mon.latest is not None and mon.step_count == 6
    assert breaks == 0                           # fullgraph=True compiled with the hooks in it
    rel = 0.0 if backend != "inductor" else 1e-6  # inductor fuses the matmuls differently
    assert same(mon.latest.streams, ref.latest.streams, rel)
    assert same(mon.latest.layers, ref.latest.layers, rel)
    assert sorted(mon.latest.layers) == ["1", "4"] and "hidden" in mon.latest.streams
    assert len(losses) == 6 and all(math.isclose(a, b, rel_tol=rel) for a, b in
                                    zip(losses, ref_losses))


def test_compiled_training_is_unchanged_by_the_monitor() -> None:
    plain, _, _ = train({"backend": "aot_eager"}, None)
    watched, mon, breaks = train({"backend": "aot_eager"}, watch_inside)
    assert watched == plain and breaks == 0
    assert mon is not None and mon.latest is not None and not mon.latest.errors


def test_watching_the_compiled_module_itself() -> None:
    def whole(mon: Monitor, model: nn.Module, compiled: nn.Module) -> None:
        assert type(compiled).__name__ == "OptimizedModule"
        mon.watch(compiled)                      # hooks on the wrapper run outside the graph

    def whole_eager(mon: Monitor, model: nn.Module, compiled: nn.Module) -> None:
        mon.watch(model)

    _, ref, _ = train(None, whole_eager)
    _, mon, _ = train({"backend": "eager", "fullgraph": True}, whole)
    assert ref is not None and mon is not None and mon.latest is not None
    assert list(mon.latest.streams) == ["sequential"]        # named after the wrapped model
    assert same(mon.latest.streams, ref.latest.streams, 0.0)  # type: ignore[union-attr]
    assert mon.latest.get("effective_rank", stream="sequential") > 1.0


@pytest.mark.parametrize("reset", [False, True])
def test_watch_added_after_the_first_compiled_call(reset: bool) -> None:
    """Dynamo does not re-check hooks of an already compiled graph (README: watch before the
    first compiled call, or ``torch.compiler.reset()`` after watching)."""
    torch.manual_seed(0)
    model = toy_mlp().eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(32, 20)
    compiled(x)                                  # graph compiled without any hook
    with Monitor(port=None, every=1, max_rows=32, window=64, capture="always") as mon:
        mon.watch(model[3], name="late")
        if reset:
            torch.compiler.reset()
        compiled(x)
        snap = mon.step()
    assert snap is not None
    if not reset:
        assert "late" not in snap.streams        # the old graph runs without the hook
        return
    with Monitor(port=None, every=1, max_rows=32, window=64, capture="always") as ref:
        ref.observe("late", model[3](model[2](model[1](model[0](x)))).detach())
        want = ref.step()
    assert want is not None
    assert snap.get("effective_rank", stream="late") == want.get("effective_rank", stream="late")


def test_a_failing_compiled_capture_is_counted_not_raised() -> None:
    def bad(mon: Monitor, model: nn.Module, compiled: nn.Module) -> None:
        mon.watch(model[3], name="bad", select=lambda out: out[:, :1].unsqueeze(-1).unsqueeze(-1)
                  .unsqueeze(-1).unsqueeze(-1))  # 6-D: to_rows rejects it at run time

    losses, mon, breaks = train({"backend": "eager", "fullgraph": True}, bad)
    assert len(losses) == 6 and breaks == 0
    assert mon is not None and sum(mon._errors.counts().values()) >= 1

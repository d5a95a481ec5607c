"""``repwatch bench``: repwatch's cost as ratios of two things measured in one run.

Every figure is a ratio of two timings taken in the same process on the same device, so it
says something about repwatch rather than about the machine:

* ``training_overhead`` (1) — training time per step with repwatch attached at its defaults
  versus without, on a small CNN and a small transformer on the CPU (ResNet-50- and ViT-B-sized
  models under bf16 autocast on a GPU; :mod:`monitor.tools.bench_models`). Target ≤ 1.03 on the
  CPU, ≤ 1.01 on a GPU.
* ``update_throughput`` (2) — rows·d² per second of the sliding-window update of
  :class:`~monitor.scorers.moments.WindowMoments` (window full, float64 accumulation; a
  publish interval of batches and the settle at its end) versus float64 GEMMs
  ``(b×d)ᵀ(b×d)`` of the batch's shape on the same device. Target ≥ 0.70. The exact window
  adds the new rows and removes the rows they overwrite with one ``b``-row product.
* ``publish_vs_eigvalsh`` (3) — :meth:`monitor.Monitor.publish` of one full stream (every
  metric, one host transfer) versus one ``torch.linalg.eigvalsh`` of a d×d float64 matrix.
  Target ≤ 1.5: all spectral metrics come from one decomposition.
* ``naive_svdvals`` (4) — a publish interval of repwatch (``every`` × ``observe``/``step``, then
  the publish) versus the public-SSL way: a ring buffer of the window's embeddings and
  ``torch.linalg.svdvals`` of it at each publish for RankMe (same window, same values; the two
  RankMe values are checked to agree to 1e-6 relative). Ratio: the speed-up.
* ``naive_item`` (4) — the same steps with every metric computed and converted with ``.item()``
  at every step (Cockpit's way) on the same scorer objects. Ratio: the speed-up.

* ``sidecar_ingest`` (5) — sidecar rows/s through a real uvicorn (raw HTTP client processes)
  and through the shared-memory ring versus the scoring backend called directly; request-body
  bytes per second on loopback in ``details``. Target ≥ 0.80.
* ``memory_per_stream`` / ``memory_per_layer`` (6) — bytes of the tensors a stream (and a
  watched activation layer) holds versus the formula of :mod:`monitor.engine.memory`.

Timing: warm-up, several repeats, median; on CUDA, ``torch.cuda.Event`` pairs around the
timed call and one synchronise after it (never inside repwatch's own code).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from monitor import Monitor
from monitor.cli.bench import FIGURES
from monitor.functional.spectral import rankme_from_singular_values
from monitor.scorers import CollapseScorer, SpectrumScorer, WindowMoments
from monitor.tools.throughput import cpu_seconds

Row = dict[str, Any]


# Sizes of each figure: full (Monitor's default window) and quick (the test: sizes where the
# per-op dispatch overhead no longer hides the ratios, a few seconds on 2 cores).
SIZES: dict[str, dict[str, Any]] = {
    "full": {"update_dims": (256, 1024), "update_rows": 256, "publish_dims": (256, 1024, 2048, 4096),
             "window": 8192, "rows": 256, "naive_dims": (256, 1024), "every": 10,
             "item_dim": 256, "repeats": 5, "workloads": ("cnn", "transformer"),
             "gpu_workloads": ("resnet50", "vit_b"), "train_blocks": 16,
             "sidecar_batches": 600, "sidecar_rounds": 3,
             "memory_dims": (256, 1024, 2048, 8192)},
    "quick": {"update_dims": (256,), "update_rows": 256, "publish_dims": (1024,),
              "window": 1024, "rows": 128, "naive_dims": (256,), "every": 10, "item_dim": 256,
              "repeats": 5, "workloads": ("cnn",), "gpu_workloads": ("cnn",),
              "train_blocks": 4, "sidecar_batches": 60, "sidecar_rounds": 1,
              "memory_dims": (256,)},
}


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int = 5,
              warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones.

    On CUDA each call is bracketed by recorded events and the host waits once after the end
    event, outside ``fn``; on the CPU ``time.perf_counter``.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    cuda = device.type == "cuda"
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_pair(fa: Callable[[], Any], fb: Callable[[], Any], device: torch.device,
              repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
    """Median seconds of ``fa()`` and of ``fb()``, timed alternately (a, b, a, b, ...) so that
    a change in the machine's load or clock during the run hits both sides of a ratio alike."""
    ta: list[float] = []
    tb: list[float] = []
    for i in range(warmup + repeats):
        a = time_call(fa, device, repeats=1, warmup=0)
        b = time_call(fb, device, repeats=1, warmup=0)
        if i >= warmup:
            ta.append(a)
            tb.append(b)
    return statistics.median(ta), statistics.median(tb)


def _batches(count: int, rows: int, dim: int, device: torch.device, seed: int) -> list[Tensor]:
    """Float32 embedding batches with a power-law spectrum (σ_k ∝ k^-0.5), fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, dim + 1, dtype=torch.float32) ** -0.5
    return [(torch.randn(rows, dim, generator=gen) * scale).to(device) for _ in range(count)]


def _row(name: str, numerator: float, denominator: float, ratio: float, target: str,
         unit: str, details: dict[str, Any]) -> Row:
    return {"name": name, "numerator": numerator, "denominator": denominator, "ratio": ratio,
            "target": target, "met": target_met(target, ratio), "unit": unit,
            "details": details}


_TARGET = re.compile(r"\s*(?P<op>>=|<=|>|<)\s*(?P<x>[-+0-9.eE]+)(?:\s.*)?$")
_TOLERANCE = re.compile(r"\s*(?P<x>[-+0-9.eE]+)\s*±\s*(?P<tol>[0-9.eE]+)(?:\s.*)?$")


def target_met(target: str, ratio: float) -> bool | None:
    """Whether ``ratio`` meets ``target`` (``">= 0.70"``, ``"<= 1.01 (GPU)"``, ``"> 1
    (speed-up)"``, ``"1.00 ± 0.02"``); None when the target cannot be read or the ratio is
    not a finite number."""
    if not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        return None
    m = _TARGET.match(target)
    if m is not None:
        x = float(m["x"])
        return {">=": ratio >= x, "<=": ratio <= x, ">": ratio > x, "<": ratio < x}[m["op"]]
    m = _TOLERANCE.match(target)
    if m is not None:
        return abs(ratio - float(m["x"])) <= float(m["tol"]) + 1e-12
    return None


def missed(result: dict[str, Any]) -> list[Row]:
    """The figures of ``result`` whose ratio misses its target."""
    return [r for r in result["figures"] if r.get("met") is False]


def _label(row: Row) -> str:
    what = row["details"].get("workload") or row["details"].get("client") or ""
    d = row["details"].get("d")
    return row["name"] + (f" ({what})" if what else "") + (f" d={d}" if d not in (None, "") else "")


@torch.no_grad()
def update_throughput(device: torch.device, dims: Sequence[int], rows: int, window: int,
                      repeats: int, interval: int = 8) -> list[Row]:
    """(2) Window update rows·d²/s vs float64 GEMM ``(b×d)ᵀ(b×d)`` rows·d²/s, per ``d``.

    One timed call is a publish interval's worth of updates: ``interval`` batches then the
    :meth:`~monitor.scorers.moments.WindowMoments.settle` a publish does first (it symmetrises
    the d×d sum once), against ``interval`` GEMMs of the same shapes."""
    out: list[Row] = []
    for d in dims:
        pool = _batches(interval, rows, d, device, seed=d)
        m = WindowMoments(d, window, device)
        for i in range(math.ceil(window / rows) + 1):            # fill the window
            m.update(pool[i % len(pool)])
            m.settle()

        def updates() -> None:
            for x in pool:
                m.update(x)                                        # (b, d) incremental
            m.settle()

        # Distinct operands of the product's shapes: a general GEMM, not a symmetric special case.
        xs = [x.to(torch.float64) for x in pool]                   # (b, d) each

        def gemms() -> None:
            for i in range(interval):
                xs[i].T @ xs[(i + 1) % interval]

        x32, y32 = pool[0], pool[1]
        t_update, t_gemm = time_pair(updates, gemms, device, repeats * 2, warmup=2)
        t_gemm32 = time_call(lambda: x32.T @ y32, device, repeats * 4, warmup=2)
        work = interval * rows * d * d
        out.append(_row("update_throughput", work / t_update, work / t_gemm, t_gemm / t_update,
                        ">= 0.70", "rows*d^2/s", {
                            "d": d, "rows": rows, "window": window, "dtype": "float64",
                            "batches_per_call": interval,
                            "update_s": t_update / interval, "gemm_s": t_gemm / interval,
                            "gemm_float32_s": t_gemm32}))
    return out


def _fill(mon: Monitor, pool: list[Tensor], batches: int) -> None:
    for i in range(batches):
        mon.observe("z", pool[i % len(pool)])


@torch.no_grad()
def publish_vs_eigvalsh(device: torch.device, dims: Sequence[int], rows: int, window: int,
                        repeats: int) -> list[Row]:
    """(3) ``Monitor.publish`` of one full stream vs one float64 ``eigvalsh`` of size d."""
    out: list[Row] = []
    for d in dims:
        n_batches = math.ceil(window / rows)
        pool = _batches(n_batches, rows, d, device, seed=d)
        mon = Monitor(run="bench", every=10**9, max_rows=rows, window=window, port=None,
                      strict=True)
        try:
            _fill(mon, pool, n_batches)
            z = torch.cat(pool)[-window:].to(torch.float64)       # the window's rows
            s = z.T @ z                                             # (d, d) as the scorer holds
            t_publish, t_eig = time_pair(mon.publish, lambda: torch.linalg.eigvalsh(s), device,
                                         repeats, warmup=1)
            snap = mon.publish()
        finally:
            mon.close()
        out.append(_row("publish_vs_eigvalsh", t_publish, t_eig, t_publish / t_eig, "<= 1.5",
                        "s", {"d": d, "window": window, "rows": rows,
                              "metrics": len(snap.streams.get("z", {})),
                              "qscore": True, "dtype": "float64"}))
    return out


def _rankme_svdvals(buf: Tensor, n: int) -> Tensor:
    """RankMe of the window buffer as public SSL code computes it: ``svdvals`` at publish."""
    s = torch.linalg.svdvals(buf)                                   # (min(n, d),)
    return rankme_from_singular_values(s, min(n, buf.shape[1]))


@torch.no_grad()
def naive_svdvals(device: torch.device, dims: Sequence[int], rows: int, window: int,
                  every: int, repeats: int) -> list[Row]:
    """(4a) One publish interval: repwatch vs a ring buffer + ``svdvals`` at each publish."""
    out: list[Row] = []
    for d in dims:
        n_batches = math.ceil(window / rows)
        pool = _batches(n_batches + every, rows, d, device, seed=d)
        mon = Monitor(run="bench", every=every, max_rows=rows, window=window, port=None,
                      strict=True)
        buf = torch.zeros(window, d, dtype=torch.float32, device=device)
        pos = 0
        fed = 0
        snaps: list[Any] = []

        def feed_naive(x: Tensor) -> None:
            nonlocal pos
            idx = (torch.arange(x.shape[0], device=device) + pos) % window
            buf.index_copy_(0, idx, x)
            pos = (pos + x.shape[0]) % window

        try:
            for i in range(n_batches):                              # fill both windows
                mon.observe("z", pool[i % len(pool)])
                feed_naive(pool[i % len(pool)])
            fed = n_batches

            def repwatch_interval() -> None:
                nonlocal fed
                for _ in range(every):
                    mon.observe("z", pool[fed % len(pool)])
                    fed += 1
                    snap = mon.step()
                    if snap is not None:
                        snaps.append(snap)

            naive_fed = fed

            def naive_interval() -> float:
                nonlocal naive_fed
                for _ in range(every):
                    feed_naive(pool[naive_fed % len(pool)])
                    naive_fed += 1
                return float(_rankme_svdvals(buf, window))          # sync at publish

            t_rep, t_naive = time_pair(repwatch_interval, naive_interval, device, repeats,
                                       warmup=1)
            svd64 = buf.to(torch.float64)
            t_svd64 = time_call(lambda: torch.linalg.svdvals(svd64), device, repeats, warmup=1)
            # Same window, same values: both have consumed the same batches now.
            assert naive_fed == fed, (naive_fed, fed)
            ours = snaps[-1].streams["z"]["effective_rank"]
            ref64 = float(_rankme_svdvals(buf.to(torch.float64), window))
            ref32 = float(_rankme_svdvals(buf, window))
            rel = abs(ours - ref64) / abs(ref64)
            if not rel <= 1e-6:
                raise AssertionError(f"RankMe disagrees: repwatch {ours!r}, svdvals {ref64!r} "
                                     f"(rel {rel:.2e})")
        finally:
            mon.close()
        out.append(_row("naive_svdvals", t_naive, t_rep, t_naive / t_rep, "> 1 (speed-up)",
                        "s/interval", {"d": d, "window": window, "rows": rows, "every": every,
                                       "naive_dtype": "float32 svdvals",
                                       "rankme_repwatch": ours, "rankme_svdvals_f64": ref64,
                                       "rel_err_f64": rel, "svdvals_float64_s": t_svd64,
                                       "rel_err_f32": abs(ours - ref32) / abs(ref64)}))
    return out


@torch.no_grad()
def naive_item(device: torch.device, dim: int, rows: int, window: int, every: int,
               repeats: int) -> list[Row]:
    """(4b) ``every`` steps: repwatch (publish every ``every`` steps, one transfer) vs every
    metric computed and ``.item()``-ed at every step, on the same scorer classes."""
    n_batches = math.ceil(window / rows)
    pool = _batches(n_batches + every, rows, dim, device, seed=dim + 1)
    mon = Monitor(run="bench", every=every, max_rows=rows, window=window, port=None, strict=True,
                  qscore=False)
    m = WindowMoments(dim, window, device)
    scorers = (SpectrumScorer(), CollapseScorer())
    state = {"fed": 0, "naive_fed": 0}
    snaps: list[Any] = []
    last: dict[str, float] = {}
    try:
        for i in range(n_batches):
            mon.observe("z", pool[i])
            m.update(pool[i])
            m.settle()
        state["fed"] = state["naive_fed"] = n_batches

        def repwatch_steps() -> None:
            for _ in range(every):
                mon.observe("z", pool[state["fed"] % len(pool)])
                state["fed"] += 1
                snap = mon.step()
                if snap is not None:
                    snaps.append(snap)

        def naive_steps() -> None:
            for _ in range(every):
                m.update(pool[state["naive_fed"] % len(pool)])
                state["naive_fed"] += 1
                values: dict[str, float] = {}
                for scorer in scorers:
                    for key, value in scorer.compute(m).items():
                        if value.numel() == 1:
                            values[key] = value.item()              # one sync per metric
                last.clear()
                last.update(values)

        t_rep, t_naive = time_pair(repwatch_steps, naive_steps, device, repeats, warmup=1)
    finally:
        mon.close()
    ours = snaps[-1].streams["z"]["effective_rank"]
    rel = abs(ours - last["effective_rank"]) / abs(last["effective_rank"])
    if state["fed"] != state["naive_fed"] or not rel <= 1e-9:
        raise AssertionError(f"values differ: repwatch {ours!r}, per-step {last['effective_rank']!r}")
    return [_row("naive_item", t_naive, t_rep, t_naive / t_rep, "> 1 (speed-up)", "s/interval",
                 {"d": dim, "window": window, "rows": rows, "every": every,
                  "metrics_per_step": len(last), "qscore": False})]


def _timed_steps(step: Callable[[], Any], mon: Monitor | None, count: int,
                 device: torch.device) -> tuple[float, float]:
    """Wall and CPU seconds of ``count`` training steps (each followed by ``mon.step()``)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)                # the benchmark's, outside repwatch
    c0, t0 = cpu_seconds(), time.perf_counter()
    for _ in range(count):
        step()
        if mon is not None:
            mon.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, cpu_seconds() - c0


def training_overhead(device: torch.device, workloads: Sequence[str], blocks: int,
                      quick: bool = False) -> list[Row]:
    """(1) Training time with repwatch attached at its defaults (capture every step, publish
    every 10, window 8192, Q-Score on) ÷ without, per workload.

    Two copies of the workload (same seed, same batch) train in one process; one is watched.
    They take turns in blocks of one publish interval (10 steps; the order alternates per
    block), so a change in the machine's speed during the run hits both sides of each block's
    ratio alike; the figure is the median of the block ratios (``details`` adds the ratio of
    the summed times, the CPU-time ratio and repwatch's own measurement of its overhead,
    ``repwatch_overhead_ratio``)."""
    from monitor.tools.bench_models import build

    out: list[Row] = []
    for name in workloads:
        plain, watched = build(name, device, quick=quick), build(name, device, quick=quick)
        mon = Monitor(run="bench", port=None)                              # the defaults
        try:
            mon.watch(watched.watched, name="features")
            every = mon.every
            _timed_steps(plain.step, None, 2 * every + 2, device)          # warm-up, past the
            _timed_steps(watched.step, mon, 2 * every + 2, device)         # first publishes
            ratios: list[float] = []
            sums = {"off": 0.0, "on": 0.0, "cpu_off": 0.0, "cpu_on": 0.0}
            for b in range(blocks):
                order = (False, True) if b % 2 == 0 else (True, False)
                for monitored in order:
                    w, c = (_timed_steps(watched.step, mon, every, device) if monitored
                            else _timed_steps(plain.step, None, every, device))
                    key = "on" if monitored else "off"
                    sums[key] += w
                    sums["cpu_" + key] += c
                    if monitored:
                        on_w = w
                    else:
                        off_w = w
                ratios.append(on_w / off_w)
            snap = mon.latest
            if snap is not None and sum(snap.errors.values()):
                raise AssertionError(f"repwatch counted errors while watching {name}: "
                                     f"{snap.errors}")
            own = snap.overhead_ratio if snap is not None else math.nan
            cadence = snap.effective_cadence_steps if snap is not None else math.nan
        finally:
            mon.close()
        steps = blocks * every
        target = "<= 1.01 (GPU)" if device.type == "cuda" else "<= 1.03"
        out.append(_row("training_overhead", sums["on"] / steps, sums["off"] / steps,
                        statistics.median(ratios), target, "s/step",
                        {"workload": name, "d": watched.dim, "batch": watched.batch,
                         "params": watched.params, "blocks": blocks, "steps_per_block": every,
                         "ratio_of_sums": sums["on"] / sums["off"],
                         "cpu_ratio": sums["cpu_on"] / sums["cpu_off"],
                         "block_ratio_quartiles": statistics.quantiles(ratios, n=4)
                         if len(ratios) >= 2 else ratios,
                         "repwatch_overhead_ratio": own, "effective_cadence_steps": cadence,
                         "amp": "bf16 autocast" if device.type == "cuda" else "float32"}))
    return out


@torch.no_grad()
def memory_per_stream(device: torch.device, dims: Sequence[int], window: int,
                      rows: int) -> list[Row]:
    """(6) Bytes one stream (and one watched activation layer of as many units) holds, measured
    (the tensor storages reachable from it; on CUDA also ``memory_allocated``) ÷ the formula of
    :mod:`monitor.engine.memory`."""
    from monitor.engine.memory import held_bytes, layer_state_bytes, stream_state_bytes

    out: list[Row] = []
    cuda = device.type == "cuda"
    for d in dims:
        x = _batches(1, rows, d, device, seed=d)[0]
        layer_net = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.ReLU()).to(device)
        if cuda:
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
        mon = Monitor(run="bench", every=10**9, max_rows=rows, window=window, port=None,
                      strict=True)
        try:
            mon.observe("z", x)
            allocated = (torch.cuda.memory_allocated(device) - before) if cuda else None
            stream = mon._engine.streams["z"]
            measured = held_bytes(stream)
            sketch = getattr(stream.moments, "sketch_dim", None)
            formula = stream_state_bytes(d, window, sketch_dim=sketch)
            out.append(_row("memory_per_stream", measured, formula, measured / formula,
                            "1.00 ± 0.02", "bytes",
                            {"d": d, "window": window, "scope": "stream", "qscore": True,
                             "cuda_memory_allocated": allocated,
                             "path": type(stream.moments).__name__}))
            mon.watch_activations(layer_net)
            layer_net(x)
            (layer,) = mon._engine.layers.values()
            measured = held_bytes(layer)
            formula = layer_state_bytes(d, window,
                                        sketch_dim=getattr(layer.moments, "sketch_dim", None))
            out.append(_row("memory_per_layer", measured, formula, measured / formula,
                            "1.00 ± 0.02", "bytes",
                            {"d": d, "units": d, "window": window, "scope": "layer",
                             "path": type(layer.moments).__name__}))
        finally:
            mon.close()
    return out


def sidecar_ingest(batches: int, rows: int, dim: int, clients: int = 2,
                   rounds: int = 1) -> list[Row]:
    """(5) Sidecar rows/s with ingest (a real uvicorn on 127.0.0.1, ``clients`` raw HTTP client
    processes; then the shared-memory ring with one producer) ÷ score-only (the scoring
    backend called directly), on the CPU; request-body bytes per second on loopback in
    ``details``. Backend: ONNX Runtime when installed (the sidecar's), else torch. Each round
    times score-only, ingest, score-only again (the faster score-only as its baseline: a load
    change during the round must not flatter the ratio); the figure is the round with the
    median ratio, and ``details["round_ratios"]`` holds them all."""
    from contextlib import nullcontext

    from monitor.sidecar.service import SidecarConfig
    from monitor.tools.throughput import ingest_and_score, make_batches, score_only

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                                       # then BLAS keeps its threads
        threadpool_limits = None

    try:
        import onnxruntime  # noqa: F401
        backend = "onnx"
    except ImportError:                                       # the bench has torch
        backend = "torch"
    config = SidecarConfig(backend=backend, device="cpu", every=50, window=4096,
                           queue_batches=64)
    data = make_batches(batches, rows, dim)
    out: list[Row] = []
    limits = (threadpool_limits(limits=config.threads) if threadpool_limits is not None
              else nullcontext())
    with limits:                                              # as `repwatch serve` does
        score_only(config, data[:20])                         # warm-up
        for client in ("raw", "shm"):
            measured = []
            for _ in range(rounds):
                base, base_cpu = score_only(config, data)
                res = ingest_and_score(config, data, clients, client)
                again, again_cpu = score_only(config, data)
                if again > base:
                    base, base_cpu = again, again_cpu
                measured.append((res.rows_per_second / base, base, base_cpu, res))
            ordered = sorted(measured, key=lambda m: m[0])
            ratio, base, base_cpu, res = ordered[len(ordered) // 2]
            out.append(_row("sidecar_ingest", res.rows_per_second, base, ratio, ">= 0.80",
                            "rows/s",
                            {"d": dim, "rows": rows, "batches": batches, "backend": backend,
                             "client": client,
                             "client_processes": 1 if client == "shm" else clients,
                             "rounds": rounds,
                             "round_ratios": [m[0] for m in measured],
                             "body_bytes_per_second": res.body_bytes_per_second,
                             "cpu_ms_per_batch_score_only": base_cpu,
                             "cpu_ms_per_batch_sidecar": res.cpu_ms_per_batch,
                             "scoring_share": base_cpu / res.cpu_ms_per_batch,
                             "cpu_ms_per_batch_clients": res.client_cpu_ms_per_batch,
                             "scored": res.scored, "dropped": res.dropped,
                             "retries": res.retries}))
    return out


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, torch version and threads, the device, the date."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def run_bench(device: str = "cpu", quick: bool = False, only: Sequence[str] | None = None,
              publish_dims: Sequence[int] | None = None) -> dict[str, Any]:
    """Run the chosen figures; returns ``{"machine", "quick", "seconds", "figures": [rows]}``."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    p = SIZES["quick" if quick else "full"]
    chosen = tuple(only) if only else FIGURES
    unknown = [name for name in chosen if name not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; choose from {FIGURES}")
    t0 = time.perf_counter()
    rows: list[Row] = []
    quiet = logging.getLogger("repwatch")     # the workloads' synthetic data fires alerts
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        rows = _run_figures(dev, p, chosen, quick, publish_dims)
    finally:
        quiet.setLevel(level)
    return {"machine": machine_info(dev), "quick": quick, "command": " ".join(sys.argv),
            "seconds": time.perf_counter() - t0, "figures": rows}


def _run_figures(dev: torch.device, p: dict[str, Any], chosen: Sequence[str], quick: bool,
                 publish_dims: Sequence[int] | None) -> list[Row]:
    rows: list[Row] = []
    for name in chosen:
        if name == "training_overhead":
            loads = p["gpu_workloads"] if dev.type == "cuda" else p["workloads"]
            rows += training_overhead(dev, loads, p["train_blocks"], quick)
        elif name == "sidecar_ingest":
            rows += sidecar_ingest(p["sidecar_batches"], 256, 128, rounds=p["sidecar_rounds"])
        elif name == "memory":
            rows += memory_per_stream(dev, p["memory_dims"], 8192, 256)
        elif name == "update_throughput":
            rows += update_throughput(dev, p["update_dims"], p["update_rows"], p["window"],
                                      p["repeats"])
        elif name == "publish_vs_eigvalsh":
            rows += publish_vs_eigvalsh(dev, publish_dims or p["publish_dims"], p["rows"],
                                        p["window"], p["repeats"])
        elif name == "naive_svdvals":
            rows += naive_svdvals(dev, p["naive_dims"], p["rows"], p["window"], p["every"],
                                  p["repeats"])
        elif name == "naive_item":
            rows += naive_item(dev, p["item_dim"], p["rows"], p["window"], p["every"],
                               p["repeats"])
    return rows


def render_table(result: dict[str, Any]) -> Any:
    """A rich Table of the figures; a missed target is marked ``MISSED`` (bold red)."""
    from rich.table import Table
    from rich.text import Text

    m = result["machine"]
    table = Table(title=f"repwatch bench — {m['device']} ({m['cpu']}, {m['cores']} cores, "
                        f"{m['threads']} threads), torch {m['torch']}, {m['date']}"
                        + (" — quick sizes" if result.get("quick") else ""))
    for col in ("figure", "d", "numerator", "denominator", "unit", "ratio", "target", "met"):
        table.add_column(col, justify="left" if col in ("figure", "unit", "target", "met")
                         else "right", no_wrap=col in ("ratio", "target", "met"))
    for row in result["figures"]:
        what = row["details"].get("workload") or row["details"].get("client") or ""
        met = row.get("met", target_met(row["target"], row["ratio"]))
        mark = (Text("ok", style="green") if met else Text("MISSED", style="bold red")
                if met is False else Text("?"))
        table.add_row(row["name"] + (f" ({what})" if what else ""),
                      str(row["details"].get("d", "")), f"{row['numerator']:.4g}",
                      f"{row['denominator']:.4g}", row["unit"], f"{row['ratio']:.3f}",
                      row["target"], mark)
    return table


def main(device: str = "cpu", quick: bool = False, out: str | None = None,
         only: Sequence[str] | None = None, publish_dims: Sequence[int] | None = None,
         fail_on_miss: bool = False) -> int:
    """``repwatch bench``: print the table (missed targets marked ``MISSED`` and listed below
    it), write the JSON file when ``out`` is given (each figure with ``met``: true, false or
    null). Exit code 0, or 1 with ``fail_on_miss`` when a target was missed."""
    from rich.console import Console

    result = run_bench(device, quick, only, publish_dims)
    console = Console(width=max(Console().width, 120))
    console.print(render_table(result))
    console.print(f"{result['seconds']:.1f} s in all")
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {out}")
    misses = missed(result)
    if misses:
        console.print(f"[bold red]MISSED[/] {len(misses)} of {len(result['figures'])} targets: "
                      + "; ".join(f"{_label(r)} {r['ratio']:.3f} (target {r['target']})"
                                  for r in misses)
                      + ("" if fail_on_miss else " (exit code 0; --fail-on-miss: 1)"),
                      soft_wrap=True, highlight=False)
    else:
        console.print(f"every target met ({len(result['figures'])} figures)")
    return 1 if misses and fail_on_miss else 0

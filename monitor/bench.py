"""``repwatch bench``: repwatch's cost as ratios of two things measured in one run (issue 7).

Every figure is a ratio of two timings taken in the same process on the same device, so it
says something about repwatch rather than about the machine:

* ``update_throughput`` (2) — rows·d² per second of the sliding-window update of
  :class:`~monitor.scorers.moments.WindowMoments` (window full, float64 accumulation) versus a
  float64 GEMM ``(b×d)ᵀ(b×d)`` of the batch's shape on the same device. Target ≥ 0.70.
  The exact window adds the new rows and removes the rows they overwrite, so the update does the
  product of ``2b`` rows; ``details.ratio_vs_2b_gemm`` compares with that GEMM.
* ``publish_vs_eigvalsh`` (3) — :meth:`monitor.Monitor.publish` of one full stream (every
  metric, one host transfer) versus one ``torch.linalg.eigvalsh`` of a d×d float64 matrix.
  Target ≤ 1.5: all spectral metrics come from one decomposition.
* ``naive_svdvals`` (4) — a publish interval of repwatch (``every`` × ``observe``/``step``, then
  the publish) versus the public-SSL way: a ring buffer of the window's embeddings and
  ``torch.linalg.svdvals`` of it at each publish for RankMe (same window, same values; the two
  RankMe values are checked to agree to 1e-6 relative). Ratio: the speed-up.
* ``naive_item`` (4) — the same steps with every metric computed and converted with ``.item()``
  at every step (Cockpit's way) on the same scorer objects. Ratio: the speed-up.

Timing: warm-up, several repeats, median; on CUDA, ``torch.cuda.Event`` pairs around the
timed call and one synchronise after it (never inside repwatch's own code).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from monitor import Monitor
from monitor.bench_cli import FIGURES
from monitor.functional.spectral import rankme_from_singular_values
from monitor.scorers import CollapseScorer, SpectrumScorer, WindowMoments

Row = dict[str, Any]


# Sizes of each figure: full (Monitor's default window) and quick (the test: sizes where the
# per-op dispatch overhead no longer hides the ratios, a few seconds on 2 cores).
SIZES: dict[str, dict[str, Any]] = {
    "full": {"update_dims": (256, 1024), "update_rows": 256, "publish_dims": (256, 1024, 2048, 4096),
             "window": 8192, "rows": 256, "naive_dims": (256, 1024), "every": 10,
             "item_dim": 256, "repeats": 5},
    "quick": {"update_dims": (256,), "update_rows": 256, "publish_dims": (1024,),
              "window": 1024, "rows": 128, "naive_dims": (256,), "every": 10, "item_dim": 256,
              "repeats": 5},
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
            "target": target, "unit": unit, "details": details}


@torch.no_grad()
def update_throughput(device: torch.device, dims: Sequence[int], rows: int, window: int,
                      repeats: int) -> list[Row]:
    """(2) Window update rows·d²/s vs float64 GEMM ``(b×d)ᵀ(b×d)`` rows·d²/s, per ``d``."""
    out: list[Row] = []
    for d in dims:
        pool = _batches(8, rows, d, device, seed=d)
        m = WindowMoments(d, window, device)
        for i in range(math.ceil(window / rows) + 1):            # fill the window
            m.update(pool[i % len(pool)])
            m.settle()
        it = iter(range(10**9))

        def step() -> None:
            m.update(pool[next(it) % len(pool)])                   # (b, d) incremental
            m.settle()                                             # no-op: keeps it incremental

        # Distinct operands of the product's shapes: a general GEMM, not a symmetric special case.
        x64, y64 = pool[0].to(torch.float64), pool[1].to(torch.float64)          # (b, d)
        x2b, y2b = (torch.cat([pool[2], pool[3]]).to(torch.float64),
                    torch.cat([pool[4], pool[5]]).to(torch.float64))          # (2b, d)
        x32, y32 = pool[6], pool[7]
        t_update, t_gemm = time_pair(step, lambda: x64.T @ y64, device, repeats * 4, warmup=2)
        t_gemm_2b = time_call(lambda: x2b.T @ y2b, device, repeats * 4, warmup=2)
        t_gemm32 = time_call(lambda: x32.T @ y32, device, repeats * 4, warmup=2)
        work = rows * d * d
        out.append(_row("update_throughput", work / t_update, work / t_gemm, t_gemm / t_update,
                        ">= 0.70", "rows*d^2/s", {
                            "d": d, "rows": rows, "window": window, "dtype": "float64",
                            "update_s": t_update, "gemm_s": t_gemm, "gemm_2b_s": t_gemm_2b,
                            "ratio_vs_2b_gemm": t_gemm_2b / t_update,
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
    for name in chosen:
        if name == "update_throughput":
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
    return {"machine": machine_info(dev), "quick": quick, "command": " ".join(sys.argv),
            "seconds": time.perf_counter() - t0, "figures": rows}


def render_table(result: dict[str, Any]) -> Any:
    """A rich Table of the figures."""
    from rich.table import Table

    m = result["machine"]
    table = Table(title=f"repwatch bench — {m['device']} ({m['cpu']}, {m['cores']} cores, "
                        f"{m['threads']} threads), torch {m['torch']}, {m['date']}")
    for col in ("figure", "d", "numerator", "denominator", "unit", "ratio", "target"):
        table.add_column(col, justify="left" if col in ("figure", "unit", "target") else "right")
    for row in result["figures"]:
        table.add_row(row["name"], str(row["details"].get("d", "")), f"{row['numerator']:.4g}",
                      f"{row['denominator']:.4g}", row["unit"], f"{row['ratio']:.3f}",
                      row["target"])
    return table


def main(device: str = "cpu", quick: bool = False, out: str | None = None,
         only: Sequence[str] | None = None, publish_dims: Sequence[int] | None = None) -> int:
    """``repwatch bench``: print the table, write the JSON file when ``out`` is given."""
    from rich.console import Console

    result = run_bench(device, quick, only, publish_dims)
    console = Console(width=max(Console().width, 110))
    console.print(render_table(result))
    console.print(f"{result['seconds']:.1f} s in all")
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {out}")
    return 0

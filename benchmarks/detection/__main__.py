"""The alert detection benchmark's command line.

    python -m benchmarks.detection run      # train every setting × seed, record traces
    python -m benchmarks.detection report   # replay the default rules, write docs/detection.md
    python -m benchmarks.detection all      # both (``make detection``)
    python -m benchmarks.detection run --benchmarks ssl --window 2048   # the window variant

``run`` needs the ``detection`` extra (lightly, torchvision, matplotlib); ``report`` only reads
the recorded traces (``benchmarks/detection/results/*.jsonl.gz``, committed) and needs
matplotlib for the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")      # one thread per run: the runs are the parallelism
BENCHMARKS = ("ssl", "plasticity", "qscore")


def _one(job: tuple[str, str, int, dict[str, Any]]) -> dict[str, Any]:
    bench, setting, seed, kw = job
    import torch

    torch.set_num_threads(1)
    if bench == "ssl":
        from benchmarks.detection.ssl import run_ssl as run
    elif bench == "plasticity":
        from benchmarks.detection.plasticity import run_plasticity as run
    else:
        from benchmarks.detection.qscore import run_qscore as run
    t0 = time.perf_counter()
    trace = run(setting, seed, **kw)
    print(f"  {bench} {setting}/{seed}: {time.perf_counter() - t0:.1f} s {trace.outcome}",
          flush=True)
    return trace.to_json()


def _settings(bench: str) -> list[str]:
    if bench == "ssl":
        from benchmarks.detection.ssl import SETTINGS
    elif bench == "plasticity":
        from benchmarks.detection.plasticity import SETTINGS  # type: ignore[assignment]
    else:
        from benchmarks.detection.qscore import SETTINGS  # type: ignore[assignment]
    return list(SETTINGS)


def cmd_run(args: argparse.Namespace) -> None:
    from benchmarks.detection.trace import Trace, save_traces

    for bench in args.benchmarks:
        settings = args.settings or _settings(bench)
        kw: dict[str, Any] = {}
        name = bench
        if args.window is not None:
            if bench != "ssl":
                raise SystemExit("--window applies to the ssl benchmark only")
            kw, name = {"window": args.window}, f"ssl-w{args.window}"
        jobs = [(bench, s, seed, kw) for s in settings for seed in range(args.seeds)]
        print(f"{bench}: {len(jobs)} runs on {args.jobs} processes", flush=True)
        t0 = time.perf_counter()
        with ProcessPoolExecutor(args.jobs) as pool:
            traces = [Trace.from_json(t) for t in pool.map(_one, jobs)]
        out = args.out / f"{name}.jsonl.gz"
        if args.settings and out.exists():           # a subset replaces only its own runs
            from benchmarks.detection.trace import load_traces

            keep = [t for t in load_traces(out) if t.setting not in set(settings)]
            traces = keep + traces
        save_traces(traces, out)
        print(f"{bench}: {len(traces)} traces in {out} ({time.perf_counter() - t0:.0f} s)")


def cmd_report(args: argparse.Namespace) -> None:
    from benchmarks.detection.report import write_report

    write_report(args.out, args.doc, figures=not args.no_figures)
    print(f"wrote {args.doc}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.detection",
                                description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "report", "all"):
        sp = sub.add_parser(name)
        sp.add_argument("--out", type=Path, default=RESULTS, help="traces directory")
        sp.add_argument("--doc", type=Path, default=Path("docs/detection.md"))
        if name != "report":
            sp.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS),
                            choices=BENCHMARKS)
            sp.add_argument("--settings", nargs="+", default=None,
                            help="only these settings (of each chosen benchmark)")
            sp.add_argument("--seeds", type=int, default=3)
            sp.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
            sp.add_argument("--window", type=int, default=None,
                            help="ssl only: Monitor(window=N) instead of the default; "
                                 "traces go to ssl-wN.jsonl.gz (the report's window section)")
        if name != "run":
            sp.add_argument("--no-figures", action="store_true")
    args = p.parse_args(argv)
    if args.cmd in ("run", "all"):
        cmd_run(args)
    if args.cmd in ("report", "all"):
        cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())

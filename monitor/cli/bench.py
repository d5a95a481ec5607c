"""The ``repwatch bench`` sub-command's arguments, importable without torch.

:mod:`monitor.tools.bench` (the cost figures of docs/performance.md) loads torch, so it is
imported only when ``bench`` runs, as ``select`` does.
"""

from __future__ import annotations

import argparse
from typing import Any

from monitor.cli.argtypes import positive_int, torch_module

FIGURES = ("training_overhead", "update_throughput", "publish_vs_eigvalsh", "naive_svdvals",
           "naive_item", "sidecar_ingest", "memory")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` to an ``argparse`` sub-parser set."""
    p = subparsers.add_parser(
        "bench", help="CPU/GPU benchmarks as ratios measured in one run (table + JSON)",
        description="repwatch's cost as ratios of two measurements taken in the same run on "
                    "the same device: training step with vs without repwatch, window update vs "
                    "GEMM, publish vs eigvalsh, the speed-up over naive svdvals-at-publish and "
                    "per-step .item() monitoring, sidecar ingest vs score-only, memory per "
                    "stream vs its formula.")
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes, as the tests run them: about 1 min on a 2-core CPU "
                        "(the full sizes about 2 min); noisier ratios, not the documented "
                        "figures")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--fail-on-miss", action="store_true",
                   help="exit 1 when a figure misses its target (missed targets are marked "
                        "MISSED either way; timings on a loaded machine can miss)")
    p.add_argument("--only", nargs="+", choices=FIGURES, default=None, metavar="NAME",
                   help=f"run only these figures ({', '.join(FIGURES)})")
    p.add_argument("--dims", nargs="+", type=positive_int, default=None, metavar="D",
                   help="embedding sizes of publish_vs_eigvalsh (default 256 1024 2048 4096)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Import :mod:`monitor.tools.bench` (needs torch) and run it; 2 with a message without
    torch."""
    bench = torch_module("bench", "monitor.tools.bench")
    if bench is None:
        return 2
    return bench.main(device=args.device, quick=args.quick, out=args.out, only=args.only,
                      publish_dims=args.dims, fail_on_miss=args.fail_on_miss)

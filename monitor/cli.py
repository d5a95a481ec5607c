"""The ``repwatch`` command line."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence

from rich.console import Console

from monitor import __version__


def _fmt(v: float, digits: int = 3) -> str:
    return "–" if not math.isfinite(v) else f"{v:.{digits}g}"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _demo(args: argparse.Namespace) -> int:
    from monitor.demo import DemoResult, run_demo
    from monitor.snapshot import Snapshot

    console = Console(highlight=False, soft_wrap=True)
    collapse_at = 0 if args.collapse else args.collapse_at
    mode = ("no stop-gradient: collapse expected" if collapse_at == 0 else
            f"stop-gradient removed after step {collapse_at}" if collapse_at is not None else
            "with stop-gradient: healthy")
    console.print(f"[bold]repwatch demo[/] — SimSiam on scikit-learn digits, {args.steps} steps, {mode}")

    def on_publish(snap: Snapshot, loss: float) -> None:
        b, p = snap.streams.get("backbone", {}), snap.streams.get("projector", {})
        alerts = ", ".join(f"[red]{a.name}[/]({a.stream})" for a in snap.alerts) or "[green]ok[/]"
        console.print(
            f"step {snap.step:5d}  loss {loss:+.3f}  "
            f"RankMe backbone {_fmt(b.get('effective_rank', math.nan)):>5} "
            f"projector {_fmt(p.get('effective_rank', math.nan)):>5}  "
            f"std ratio {_fmt(p.get('embedding_std_ratio', math.nan)):>6}  alerts: {alerts}")

    def on_done(result: DemoResult) -> None:
        console.print(f"trained {args.steps} steps in {result.seconds:.1f} s; "
                      f"{len(result.fired)} alert(s) fired")
        for step, alert in result.fired:
            console.print(f"  step {step}: [bold red]{alert.name}[/] on {alert.stream}: {alert.description}")
        if result.url and args.linger > 0:
            console.print(f"Serving the final state for {args.linger:g} s (Ctrl-C to stop): "
                          f"{result.url}/  and  {result.url}/metrics")

    port = None if args.port < 0 else args.port

    def announce(url: str | None) -> None:
        if url:
            console.print(f"Live: status page [bold]{url}/[/], Prometheus metrics {url}/metrics")

    result = run_demo(steps=args.steps, collapse_at=collapse_at, seed=args.seed,
                      device=args.device, every=args.every, port=port, host=args.host,
                      on_publish=on_publish, linger=args.linger, on_done=on_done,
                      on_start=announce)
    return 0 if result.snapshots else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``repwatch`` console script."""
    parser = argparse.ArgumentParser(prog="repwatch", description=(
        "Streaming representation-health monitor for PyTorch training."))
    parser.add_argument("--version", action="version", version=f"repwatch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="SimSiam on digits with live metrics and alerts")
    demo.add_argument("--steps", type=_positive, default=600, help="training steps (default 600)")
    phase = demo.add_mutually_exclusive_group()
    phase.add_argument("--collapse", action="store_true",
                       help="drop the stop-gradient for the whole run (collapses)")
    phase.add_argument("--collapse-at", type=_positive, default=None, metavar="STEP",
                       help="drop the stop-gradient after STEP (healthy, then collapse)")
    demo.add_argument("--every", type=_positive, default=10, help="publish every N steps (default 10)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=9400, help="HTTP port (0: any free; -1: none)")
    demo.add_argument("--linger", type=float, default=0.0, metavar="SECONDS",
                      help="keep serving the final state this long after training")
    demo.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""The ``repwatch`` command line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console, RenderableType

from monitor import __version__
from monitor.cli.argtypes import positive_int
from monitor.snapshot import SignalKey, Snapshot

if TYPE_CHECKING:
    from rich.live import Live


def _fmt(v: float, digits: int = 3) -> str:
    return "–" if not math.isfinite(v) else f"{v:.{digits}g}"


_positive = positive_int


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _start_sidecar(args: argparse.Namespace, console: Console) -> tuple[object, str]:
    """Start ``repwatch serve`` as a child process on a free port; return (process, URL)."""
    import subprocess
    import time

    import httpx

    port = args.port if args.port > 0 else _free_port(args.host)
    cmd = [sys.executable, "-m", "monitor.cli", "serve", "--host", args.host, "--port", str(port),
           "--every", str(args.every), "--window", "2048"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://{args.host}:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the sidecar exited with {proc.returncode}: "
                               f"{(proc.stderr.read() if proc.stderr else '')[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                console.print(f"Sidecar: [bold]{url}/[/] (live dashboard), {url}/metrics "
                              f"(pid {proc.pid}; the trainer only captures and ships rows)")
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the sidecar did not become ready within 60 s")


def _sidecar_snapshot(url: str, run: str) -> dict:  # type: ignore[type-arg]
    """The sidecar's latest status of ``run`` ({} when it has none yet)."""
    import httpx

    try:
        runs = httpx.get(f"{url}/v1/runs", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return next((r for r in runs if r.get("run") == run), {})


def _cap_threads(threads: int) -> None:
    """Cap torch's intra-op CPU threads for the demo's training: its models are tiny, and more
    threads only add spin-waiting, many times the training itself on a busy machine."""
    import torch

    torch.set_num_threads(threads)


def _demo(args: argparse.Namespace) -> int:
    _cap_threads(args.threads)
    if args.scenario == "plasticity":
        return _demo_plasticity(args)
    if args.sink is not None:
        return _demo_sidecar(args)
    from monitor.tools.demo import DemoResult, run_demo

    console = Console(highlight=False, soft_wrap=True)
    collapse_at = 0 if args.collapse else args.collapse_at
    mode = ("no stop-gradient: collapse expected" if collapse_at == 0 else
            f"stop-gradient removed after step {collapse_at}" if collapse_at is not None else
            "with stop-gradient: healthy")
    console.print(f"[bold]repwatch demo[/] — SimSiam on scikit-learn digits, {args.steps} steps, {mode}")

    view = _live_view(args, console)

    def on_publish(snap: Snapshot, loss: float) -> None:
        if view is not None:
            view.add(snap, note=f"training loss {loss:+.3f} at step {snap.step}")
            return
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
                          f"dashboard {result.url}/  and  metrics {result.url}/metrics")

    port = None if args.port < 0 else args.port

    def announce(url: str | None) -> None:
        if url:
            console.print(f"Live: dashboard [bold]{url}/[/], Prometheus metrics {url}/metrics")

    with _live(view, console):
        result = run_demo(steps=args.steps, collapse_at=collapse_at, seed=args.seed,
                          device=args.device, every=args.every, port=port, host=args.host,
                          on_publish=on_publish, linger=args.linger, on_done=on_done,
                          on_start=announce)
    return 0 if result.snapshots else 1


def _live_view(args: argparse.Namespace, console: Console) -> DemoView | None:
    """The demo's live table when stdout is a terminal and ``--plain`` is not given (None:
    print one line per publish, as in pipes, tests and CI logs)."""
    if args.plain or not sys.stdout.isatty():
        return None
    return DemoView(console)


class DemoView:
    """The live table of a demo (:mod:`monitor.cli.watch`), fed from the Monitor's snapshots or
    from a sidecar's ``/v1/runs``; ``live`` is set while it is on screen."""

    def __init__(self, console: Console) -> None:
        from monitor.cli.watch import SnapshotView, spark_width

        self.view = SnapshotView(width=spark_width(console.width), title="repwatch demo")
        self.live: Live | None = None

    def add(self, snap: Snapshot | dict[str, Any], note: str | None = None) -> None:
        """Show a :class:`~monitor.snapshot.Snapshot` (or its dict), ``note`` below the table."""
        self.view.add(snap if isinstance(snap, dict) else snap.to_dict())
        self.show(self.view.table(note))

    def show(self, table: RenderableType) -> None:
        """Put ``table`` on screen (while live)."""
        if self.live is not None:
            self.live.update(table)


@contextlib.contextmanager
def _live(view: DemoView | None, console: Console) -> Iterator[None]:
    """Keep ``view``'s table live on ``console`` (nothing when None)."""
    if view is None:
        yield
        return
    from monitor.cli.watch import live

    with live(console, view.view.table()) as lv:
        view.live = lv
        try:
            yield
        finally:
            view.live = None                              # Live's exit draws the last table


def _demo_sidecar(args: argparse.Namespace) -> int:
    """The SimSiam demo in sidecar mode: the sidecar at ``--sink URL`` (``http(s)://`` or
    ``shm://NAME``; e.g. in compose or a pod), or a ``repwatch serve`` child started here, scores
    what the trainer ships."""
    import time

    from monitor.tools.demo import DemoResult, run_demo
    from monitor.sidecar.cli import read_token

    console = Console(highlight=False, soft_wrap=True)
    collapse_at = 0 if args.collapse else args.collapse_at
    run = "demo-collapse" if collapse_at is not None else "demo"
    token = None
    if args.token_file is not None:
        if not args.sink.startswith(("http://", "https://")):
            print("repwatch demo: error: --token-file needs --sink http(s)://HOST:PORT",
                  file=sys.stderr)
            return 2
        try:
            token = read_token(args.token_file)
        except ValueError as exc:
            print(f"repwatch demo: error: {exc}", file=sys.stderr)
            return 2
    console.print(f"[bold]repwatch demo --sink[/] — SimSiam on digits, {args.steps} steps, "
                  f"scored by a sidecar")
    proc: object | None = None
    if args.sink:
        url = args.sink
        console.print(f"Sidecar: [bold]{url}[/] (the trainer only captures and ships rows)")
    else:
        proc, url = _start_sidecar(args, console)
    status_url = url if url.startswith(("http://", "https://")) else None   # shm: no HTTP here
    seen: set[str] = set()
    view = _live_view(args, console) if status_url else None

    def show_sidecar() -> None:
        """The live table from the sidecar's /v1/runs and history (kept on a failed poll)."""
        from monitor.cli.watch import WatchError, build_table, fetch, spark_width

        if view is None or status_url is None:
            return
        try:
            runs, hist = fetch(status_url, run, token=token)
        except WatchError:
            return
        view.show(build_table(runs, hist, title=f"repwatch demo · sidecar {status_url}",
                              width=spark_width(console.width)))

    def on_publish(snap: Snapshot, loss: float) -> None:
        status = _sidecar_snapshot(status_url, run) if status_url else {}
        p = status.get("streams", {}).get("projector", {})
        alerts = [a["name"] for a in status.get("alerts", [])]
        for name in alerts:
            if name not in seen:
                seen.add(name)
                console.print(f"[bold red]ALERT {name}[/] (on the sidecar, step {status.get('step')})")
        if view is not None:
            show_sidecar()
            return
        rank = p.get("effective_rank")
        std = p.get("embedding_std_ratio")
        console.print(f"step {snap.step:5d}  loss {loss:+.3f}  sidecar step {status.get('step', '–')}"
                      f"  RankMe projector {_fmt(rank if rank is not None else math.nan):>5}"
                      f"  std ratio {_fmt(std if std is not None else math.nan):>6}"
                      f"  alerts: {', '.join(alerts) or 'ok'}"
                      f"  dropped: {snap.dropped or 0}")

    try:
        with _live(view, console):
            result: DemoResult = run_demo(steps=args.steps, collapse_at=collapse_at,
                                          seed=args.seed, device=args.device, every=args.every,
                                          port=None, run=run, on_publish=on_publish, sink=url,
                                          token=token)
            time.sleep(1.0)                               # let the last batches be scored
            show_sidecar()
        status = _sidecar_snapshot(status_url, run) if status_url else {}
        if status_url:
            console.print(f"trained {args.steps} steps in {result.seconds:.1f} s; the sidecar "
                          f"published step {status.get('step')} with alerts "
                          f"{[a['name'] for a in status.get('alerts', [])]}")
        else:
            last = result.snapshots[-1] if result.snapshots else None
            console.print(f"trained {args.steps} steps in {result.seconds:.1f} s; rows shipped "
                          f"to {url} (dropped: {(last.dropped if last else None) or 0}); its "
                          f"metrics are on the sidecar's /metrics")
        if args.linger > 0:
            console.print(f"Lingering {args.linger:g} s (the sidecar at {url} keeps serving)")
            try:
                time.sleep(args.linger)
            except KeyboardInterrupt:
                pass
        return 0 if (status if status_url else result.snapshots) else 1
    finally:
        if proc is not None:
            _stop(proc)


def _stop(proc: object) -> None:
    """Terminate the sidecar child started by :func:`_start_sidecar` (kill after 10 s)."""
    proc.terminate()                                      # type: ignore[attr-defined]
    try:
        proc.wait(10)                                     # type: ignore[attr-defined]
    except Exception:
        proc.kill()                                       # type: ignore[attr-defined]


def _demo_plasticity(args: argparse.Namespace) -> int:
    from monitor.tools.demo_plasticity import (PLASTICITY_ALERT, PlasticityResult,
                                               run_plasticity_demo)

    console = Console(highlight=False, soft_wrap=True)
    console.print(f"[bold]repwatch demo --scenario plasticity[/] — an MLP on {args.tasks} "
                  f"random-label tasks over digits ({args.steps_per_task} steps each)"
                  + (", ReDo on alert" if args.redo else ""))

    view = _live_view(args, console)

    def on_publish(snap: Snapshot) -> None:
        if view is not None:
            view.add(snap)
            return
        if snap.step % args.steps_per_task:
            return
        parts = []
        dormant = SignalKey.of("dormant_units_ratio", tau=0.1)
        for layer, v in sorted(snap.layers.items()):
            parts.append(f"layer {layer}: dormant(0.1) {_fmt(v.get(dormant, math.nan)):>5} "
                         f"erank {_fmt(v.get('effective_rank', math.nan)):>5}")
        alerts = ", ".join(f"[red]{a.name}[/]({a.stream})" for a in snap.alerts) or "[green]ok[/]"
        console.print(f"step {snap.step:5d}  " + "  ".join(parts) + f"  alerts: {alerts}")

    def on_task_end(task: int, acc: float, result: PlasticityResult) -> None:
        redo = [n for t, n in result.recycled if t == task]
        note = f"  ReDo recycled {redo[0]} units" if redo else ""
        console.print(f"task {task:3d}: training accuracy {acc:.2f}{note}")

    port = None if args.port < 0 else args.port

    def announce(url: str | None) -> None:
        if url:
            console.print(f"Live: dashboard [bold]{url}/[/], Prometheus metrics {url}/metrics")

    every = args.every if args.every_given else max(1, args.steps_per_task // 2)
    with _live(view, console):
        result = run_plasticity_demo(tasks=args.tasks, steps_per_task=args.steps_per_task,
                                     redo=args.redo, seed=args.seed, device=args.device,
                                     every=every, port=port, host=args.host,
                                     on_publish=on_publish, on_task_end=on_task_end,
                                     on_start=announce, linger=args.linger)
    k = min(5, len(result.accuracies))
    console.print(f"trained in {result.seconds:.1f} s; first {k} tasks' accuracy "
                  f"{sum(result.accuracies[:k]) / max(k, 1):.2f}, last {k} "
                  f"{sum(result.accuracies[-k:]) / max(k, 1):.2f}; {PLASTICITY_ALERT} first fired "
                  f"at step {result.first_fired()}")
    return 0 if result.snapshots else 1


def _watch(args: argparse.Namespace) -> int:
    """``repwatch watch URL``: the live terminal table of a repwatch server (torch-free)."""
    from monitor.sidecar.cli import read_token
    from monitor.cli.watch import watch

    token = None
    if args.token_file is not None:
        try:
            token = read_token(args.token_file)
        except ValueError as exc:
            print(f"repwatch watch: error: {exc}", file=sys.stderr)
            return 2
    return watch(args.url, run=args.run, interval=args.interval, once=args.once, token=token)


def _positive_float(text: str) -> float:
    """A finite float > 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _runbook_base(text: str) -> str:
    """An absolute http(s) URL (argparse type of ``--runbook-base``)."""
    from exporters.rules import check_runbook_base

    try:
        return check_runbook_base(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _manifests(args: argparse.Namespace) -> int:
    """Write the generated Kubernetes manifests (PrometheusRule, dashboard ConfigMap): into
    ``--out``, or without it into the repository's component folder, which must be under the
    working directory (refused elsewhere: a stray ``./deploy/...`` would hold 2 of its 5 files).
    Every path written is printed, absolute."""
    from pathlib import Path

    from exporters.k8s import (COMPONENT_DIR, DASHBOARD_FILE, HAND_WRITTEN_FILES,
                               PROMETHEUS_RULE_FILE, write_manifests)
    from exporters.rules import DEFAULT_RUNBOOK_BASE

    generated = f"{PROMETHEUS_RULE_FILE} and {DASHBOARD_FILE}"
    if args.out is None:
        out = Path(COMPONENT_DIR)
        if not (out / HAND_WRITTEN_FILES[0]).is_file():
            print(f"repwatch manifests: error: {Path.cwd() / COMPONENT_DIR} is not the "
                  f"repository's component folder (no {HAND_WRITTEN_FILES[0]}; run it from the "
                  f"root of a repwatch checkout, or give --out DIR). It writes the 2 generated "
                  f"files of the component only ({generated}); the other "
                  f"{len(HAND_WRITTEN_FILES)} ({', '.join(HAND_WRITTEN_FILES)}) are the "
                  f"repository's.", file=sys.stderr)
            return 2
    else:
        out = Path(args.out)
    for path in write_manifests(out, runbook_base=args.runbook_base):
        print(f"wrote {path.resolve()}")
    missing = [f for f in HAND_WRITTEN_FILES if not (out / f).is_file()]
    if missing:
        print(f"note: {out.resolve()} holds the 2 generated files only; the component also "
              f"needs {', '.join(missing)} from the repository's {COMPONENT_DIR}/ (not "
              f"generated, not written here)", file=sys.stderr)
    if args.runbook_base is None:
        print(f"note: runbook links point to {DEFAULT_RUNBOOK_BASE} (a repwatch server on "
              f"the viewer's machine, e.g. after kubectl port-forward POD 9400); pass "
              f"--runbook-base URL for where your operators read the runbooks",
              file=sys.stderr)
    return 0


def _write_out(text: str, out: str | None) -> int:
    """Write a generated file to ``out`` (stdout for None or '-')."""
    if out in (None, "-"):
        sys.stdout.write(text)
    else:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


def _rules(args: argparse.Namespace) -> int:
    """Write the Prometheus alert rules rendered from the alert spec (stdout by default)."""
    from exporters.rules import render_yaml

    return _write_out(render_yaml(runbook_base=args.runbook_base), args.out)


def _dashboard(args: argparse.Namespace) -> int:
    """Write the Grafana dashboard JSON generated from the catalogue (stdout by default)."""
    from exporters.grafana import render_json

    return _write_out(render_json(), args.out)


def _grafana_push(args: argparse.Namespace) -> int:
    """Push the dashboard (and with --alerts the alert rules) to Grafana; exit 2 on failure."""
    from exporters.grafana import PushError, push, read_token

    try:
        result = push(args.url, read_token(args.token_file), folder=args.folder,
                      alerts=args.alerts, insecure=args.insecure,
                      datasource_uid=args.datasource_uid)
    except PushError as exc:
        print(f"repwatch grafana push: {exc}", file=sys.stderr)
        return 2
    print(f"folder {'created' if result.folder_created else 'exists'}; dashboard saved "
          f"(version {result.dashboard_version}): {result.dashboard_url}")
    if args.alerts:
        print(f"alert rules: {len(result.rules_created)} created, "
              f"{len(result.rules_updated)} updated")
    return 0


class _Given(argparse.Action):
    """Store the value and remember that the user gave it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, self.dest + "_given", True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``repwatch`` console script."""
    parser = argparse.ArgumentParser(prog="repwatch", description=(
        "Streaming representation-health monitor for PyTorch training."))
    parser.add_argument("--version", action="version", version=f"repwatch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="SimSiam on digits (or --scenario plasticity) with live "
                                       "metrics and alerts")
    demo.add_argument("--scenario", choices=("collapse", "plasticity"), default="collapse",
                      help="collapse (default): SimSiam with/without stop-gradient; plasticity: "
                           "random-label tasks that make units go dormant")
    demo.add_argument("--steps", type=_positive, default=600, help="training steps (default 600)")
    phase = demo.add_mutually_exclusive_group()
    phase.add_argument("--collapse", action="store_true",
                       help="drop the stop-gradient for the whole run (collapses)")
    phase.add_argument("--collapse-at", type=_positive, default=None, metavar="STEP",
                       help="drop the stop-gradient after STEP (healthy, then collapse)")
    demo.add_argument("--every", type=_positive, default=10, action=_Given,
                      help="publish every N steps (default 10; plasticity: half a task)")
    plast = demo.add_argument_group("plasticity scenario")
    plast.add_argument("--tasks", type=_positive, default=30, help="random-label tasks (default 30)")
    plast.add_argument("--steps-per-task", type=_positive, default=100,
                       help="steps per task (default 100)")
    plast.add_argument("--redo", action="store_true",
                       help="recycle dormant units (ReDo) at task ends while the alert fires")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    demo.add_argument("--threads", type=_positive, default=1,
                      help="torch CPU threads for training (default 1: the demo's models are "
                           "tiny, more threads only contend on a busy machine)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=9400, help="HTTP port (0: any free; -1: none)")
    demo.add_argument("--sink", nargs="?", const="", default=None, metavar="URL",
                      help="sidecar mode: ship the rows to the sidecar at URL (http://HOST:PORT "
                           "or shm://NAME); without URL, start `repwatch serve` here")
    demo.add_argument("--token-file", default=None, metavar="FILE",
                      help="with --sink http(s)://...: file holding the sidecar's bearer token")
    demo.add_argument("--linger", type=float, default=0.0, metavar="SECONDS",
                      help="keep serving the final state this long after training")
    demo.add_argument("--plain", action="store_true",
                      help="one line per publish instead of the live table (the default when "
                           "stdout is not a terminal)")
    demo.set_defaults(func=_demo, every_given=False)

    watch = sub.add_parser("watch", help="live terminal table of a repwatch server (in-process "
                                         "or sidecar)")
    watch.add_argument("url", metavar="URL", help="server base URL, e.g. http://127.0.0.1:9400")
    watch.add_argument("--run", default=None, help="show only this run")
    watch.add_argument("--interval", type=_positive_float, default=2.0, metavar="SECONDS",
                       help="poll every SECONDS (default 2)")
    watch.add_argument("--once", action="store_true",
                       help="print one frame and exit (into a pipe or a file: never wrapped, "
                            "one line per row, whatever $COLUMNS says)")
    watch.add_argument("--token-file", default=None, metavar="FILE",
                       help="file holding a bearer token sent with every request")
    watch.set_defaults(func=_watch)

    rules = sub.add_parser("rules", help="render the Prometheus alert rules from the alert spec")
    rules.add_argument("--out", default=None, metavar="PATH",
                       help="write here (default: stdout), e.g. deploy/prometheus/rules.yml")
    rules.add_argument("--runbook-base", default=None, metavar="URL", type=_runbook_base,
                       help="absolute http(s) URL of the runbooks the alerts link to (default: "
                            "$REPWATCH_RUNBOOK_BASE when it is one, else "
                            "http://127.0.0.1:9400/runbooks: the page a repwatch server on the "
                            "viewer's machine serves)")
    rules.set_defaults(func=_rules)

    manifests = sub.add_parser("manifests", help="render the generated files of the Kubernetes "
                                                 "component (PrometheusRule, dashboard ConfigMap)")
    manifests.add_argument("--out", default=None, metavar="DIR",
                           help="where to write the 2 generated files (default: "
                                "deploy/k8s/components/repwatch, only when run from the "
                                "repository's root; elsewhere --out is required)")
    manifests.add_argument("--runbook-base", default=None, metavar="URL", type=_runbook_base,
                           help="absolute http(s) URL of the runbooks (as for `repwatch rules`)")
    manifests.set_defaults(func=_manifests)

    dash = sub.add_parser("dashboard", help="render the Grafana dashboard from the catalogue")
    dash.add_argument("--out", default=None, metavar="PATH",
                      help="write here (default: stdout), e.g. "
                           "deploy/grafana/dashboards/repwatch.json")
    dash.set_defaults(func=_dashboard)

    grafana = sub.add_parser("grafana", help="Grafana operations (needs the grafana extra)")
    gsub = grafana.add_subparsers(dest="grafana_command", required=True)
    gpush = gsub.add_parser("push", allow_abbrev=False,   # `--token x` must not mean a file
                            help="create/update the repwatch folder and dashboard (and with "
                                 "--alerts the Grafana-managed alert rules)")
    gpush.add_argument("--url", required=True, help="Grafana base URL, e.g. http://grafana:3000")
    gpush.add_argument("--token-file", required=True, metavar="FILE",
                       help="file holding a service-account token (never pass it on argv)")
    gpush.add_argument("--folder", default="repwatch", metavar="NAME",
                       help="title of the folder (UID repwatch) created when missing")
    gpush.add_argument("--alerts", action="store_true",
                       help="also push the alert rules of the spec as Grafana-managed rules")
    gpush.add_argument("--insecure", action="store_true",
                       help="do not verify the server's TLS certificate")
    gpush.add_argument("--datasource-uid", default="repwatch-prometheus", metavar="UID",
                       help="Prometheus data source the alert rules query (default: the "
                            "provisioned repwatch-prometheus)")
    gpush.set_defaults(func=_grafana_push)

    from monitor.cli.bench import add_parser as add_bench
    from monitor.cli.report import add_parser as add_report
    from monitor.cli.select import add_parser as add_select
    from monitor.sidecar.cli import add_parser as add_serve
    add_select(sub)
    add_serve(sub)
    add_bench(sub)
    add_report(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


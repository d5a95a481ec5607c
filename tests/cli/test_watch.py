"""The terminal view (monitor/cli/watch.py, `repwatch watch`, the demo's live table)."""

from __future__ import annotations

import http.server
import math
import os
import pty
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from monitor.cli.watch import SPARK_CHARS, build_table, resample, sparkline
from tests.subproc import run_python
from tests.torchless_serve import free_port

ROOT = Path(__file__).resolve().parents[2]
TORCHLESS_CLI = ("import sys; sys.modules['torch'] = None\n"
                 "from monitor.cli import main\n"
                 "sys.exit(main(sys.argv[1:]))\n")


# ---- sparkline ------------------------------------------------------------------------------

def test_sparkline_maps_min_to_lowest_and_max_to_highest_level() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([0.0, 7.0, 2.0]) == "▁█▃"
    assert sparkline([-3.5, -10.5]) == "█▁"            # scale is min..max, not 0..max


def test_sparkline_constant_series_is_mid_height() -> None:
    assert sparkline([5.0, 5.0, 5.0]) == "▄▄▄"
    assert sparkline([0.0]) == "▄"


def test_sparkline_missing_values_are_gaps() -> None:
    assert sparkline([1.0, None, math.nan, 3.0, math.inf]) == "▁  █ "
    assert sparkline([None, None]) == "  "
    assert sparkline([]) == ""


def test_sparkline_resamples_longer_series_by_bucket_means() -> None:
    # 24 values, each level three times; width 8 → one bucket per level
    assert sparkline([v for v in range(8) for _ in range(3)], width=8) == "▁▂▃▄▅▆▇█"
    assert resample([1, 2, 3, 4, 5], 2) == [1.5, 4.0]              # buckets [0:2], [2:5]
    assert resample([None, math.nan, 1.0, 3.0], 2) == [None, 2.0]  # an all-missing bucket
    assert sparkline([None, None, 1.0, 3.0], width=2) == " ▄"
    long = sparkline(list(range(100)), width=24)
    assert len(long) == 24 and long[0] == "▁" and long[-1] == "█"
    assert list(long) == sorted(long, key=SPARK_CHARS.index)      # monotone input stays so
    with pytest.raises(ValueError, match="width"):
        sparkline([1.0], width=0)


# ---- the table from real snapshots -----------------------------------------------------------

@pytest.fixture(scope="module")
def demo() -> Any:
    """Snapshots of a short collapse demo run (no stop-gradient: the collapse alert fires)."""
    from monitor.tools.demo import run_demo

    result = run_demo(steps=60, collapse_at=0, port=None, device="cpu", every=10)
    assert result.snapshots
    return result


@pytest.fixture(scope="module")
def tiny() -> list[dict[str, Any]]:
    """Snapshot dicts of a tiny MLP watched as a stream (Q-Score with a set threshold) and an
    activation layer of which half the units are dead (bias -100)."""
    import torch

    from monitor import Monitor

    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16),
                              torch.nn.ReLU())
    with torch.no_grad():
        net[0].bias[:16] = -100.0
    mon = Monitor(run="tiny", every=2, port=None, qscore={"threshold": 2.0})
    snaps = []
    try:
        mon.watch(net, name="head")
        mon.watch_activations(net, names=["1"])
        for _ in range(8):
            net(torch.randn(64, 8, generator=gen))
            snap = mon.step()
            if snap is not None:
                snaps.append(snap.to_dict())
    finally:
        mon.close()
    return snaps


def _render(table: Any, width: int = 200) -> str:
    console = Console(record=True, width=width, file=open(os.devnull, "w"))
    console.print(table)
    console.file.close()
    return console.export_text()


def _row(text: str, name: str) -> str:
    rows = [line for line in text.splitlines() if line.split()[:1] == [name]]
    assert len(rows) == 1, f"no single row for {name!r} in\n{text}"
    return rows[0]


def _check_sparkline(row: str, series: Sequence[float]) -> None:
    """The row's sparkline has one level per snapshot, min at ▁ and max at █."""
    spark = "".join(c for c in row if c in SPARK_CHARS)
    assert len(spark) == len(series), (row, series)
    assert spark[series.index(min(series))] == "▁"
    assert spark[series.index(max(series))] == "█"


@pytest.mark.slow
def test_table_shows_the_values_of_a_collapse_run(demo: Any) -> None:
    history = [s.to_dict() for s in demo.snapshots]
    last = history[-1]
    text = _render(build_table([last], {last["run"]: history}))
    assert last["run"] in text
    fired = last["alerts"]
    assert fired, "the collapse demo fired no alert"
    for stream, values in last["streams"].items():
        cells = _row(text, stream).split()
        assert str(last["step"]) in cells
        assert f"{values['effective_rank']:.1f}" in cells
        assert f"{values['embedding_std_ratio']:.3g}" in cells
        _check_sparkline(_row(text, stream),
                         [h["streams"][stream]["effective_rank"] for h in history])
        mine = [a["name"] for a in fired if a["stream"] == stream]
        row = _row(text, stream)
        for name in mine:
            assert name.removeprefix("Repwatch") in row
        if not mine:
            assert row.split()[-1] == "ok"
    for alert in fired:                                 # in full, in the caption
        assert re.search(rf"firing: {alert['name']} on {alert['stream']} since step "
                         rf"{alert['since_step']}\b", text)
    samples = sum(c["samples"] for c in last["counters"].values())
    assert f"samples scored {samples:,.0f} · dropped 0 · errors 0" in text


def test_table_shows_dormant_and_low_quality_fractions(tiny: list[dict[str, Any]]) -> None:
    last = tiny[-1]
    text = _render(build_table([last], {"tiny": tiny}))
    layer = last["layers"]["1"]
    cells = _row(text, "1").split()
    assert cells[1] == "(layer)"
    assert f"{layer['dormant_units_ratio{tau=0.1}']:.3g}" in cells
    assert f"{layer['effective_rank']:.1f}" in cells
    head = last["streams"]["head"]
    low = head["low_quality_samples_ratio"]
    assert low is not None and 0 < low < 1, low
    assert f"{low:.3g}" in _row(text, "head").split()
    _check_sparkline(_row(text, "head"), [h["streams"]["head"]["effective_rank"] for h in tiny])


@pytest.mark.slow
def test_table_of_several_runs_has_a_run_column_and_a_note(demo: Any,
                                                            tiny: list[dict[str, Any]]) -> None:
    a = demo.snapshots[-1].to_dict()
    text = _render(build_table([a, tiny[-1]], {}, note="cannot reach somewhere"))
    rows = [line.split() for line in text.splitlines()]
    assert sorted(r[1] for r in rows if r[:1] == [a["run"]]) == sorted(a["streams"])
    assert sorted(r[1] for r in rows if r[:1] == ["tiny"]) == ["1", "head"]
    assert "cannot reach somewhere" in text
    assert "no run has published yet" in _render(build_table([], {}))


# ---- repwatch watch against a real server -----------------------------------------------------

@pytest.fixture()
def served(demo: Any) -> Iterator[str]:
    """The demo's snapshots served by the in-process server app on a free loopback port."""
    from monitor.server import BackgroundServer, create_app

    server = BackgroundServer(create_app(lambda: demo.snapshots[-1], lambda: demo.snapshots),
                              host="127.0.0.1", port=0)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def _watch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`repwatch watch ...` in a child process where torch cannot be imported."""
    return subprocess.run([sys.executable, "-c", TORCHLESS_CLI, "watch", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "COLUMNS": "160"})


@pytest.mark.e2e
def test_watch_once_prints_the_run_and_its_alert_without_torch(served: str, demo: Any) -> None:
    last = demo.snapshots[-1]
    out = _watch(served, "--once", "--run", last.run)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"run {last.run}" in out.stdout
    assert last.alerts and all(f"firing: {a.name}" in out.stdout for a in last.alerts)
    spark = "".join(c for c in _row(out.stdout, "projector") if c in SPARK_CHARS)
    assert len(spark) == len(demo.snapshots)            # the history endpoint was read
    missing = _watch(served, "--once", "--run", "no-such-run")
    assert missing.returncode == 2 and "no run 'no-such-run'" in missing.stderr


@pytest.mark.e2e
def test_watch_unreachable_url_is_one_line_and_exit_2() -> None:
    out = _watch(f"http://127.0.0.1:{free_port()}", "--once", timeout=60)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repwatch watch: error: cannot reach")


@pytest.mark.e2e
def test_watch_non_json_answer_is_one_line_and_exit_2() -> None:
    class Html(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b"<html>not repwatch</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Html)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        out = _watch(f"127.0.0.1:{server.server_address[1]}", "--once", timeout=60)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "did not answer JSON" in lines[0], out.stderr


# ---- the demo in a terminal ------------------------------------------------------------------

def _run_in_pty(cmd: list[str], timeout: float) -> tuple[int, str]:
    """Run ``cmd`` with a pseudo-terminal as stdin/stdout/stderr; (exit code, output)."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "LINES": "40", "TERM": "xterm"}
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:                          # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return rc, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode("utf-8", "replace"))


@pytest.mark.e2e
def test_demo_in_a_terminal_shows_the_live_table() -> None:
    rc, text = _run_in_pty([sys.executable, "-m", "monitor.cli", "demo", "--steps", "20",
                            "--every", "10", "--port", "-1", "--device", "cpu"], timeout=240)
    assert rc == 0, text[-3000:]
    assert "repwatch demo · run demo" in text
    assert re.search(r"backbone +20 +\d+\.\d +[▁▂▃▄▅▆▇█]{2} ", text), text[-3000:]
    assert "samples scored" in text
    assert "RankMe backbone" not in text                # no per-publish lines in a terminal


@pytest.mark.e2e
def test_the_module_imports_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "import monitor.cli.watch, monitor.cli\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['torch']"            # only the blocked entry itself


def test_names_from_the_server_are_rendered_as_text() -> None:
    """A hostile server's names and error keys are shown, never interpreted: no escape sequence
    (window title, clear screen) and no rich markup reaches the terminal."""
    title, clear = "\x1b]0;pwned\x07", "\x1b[2J"
    snap = {"run": f"r{title}", "step": 3, "time": 0.0,
            "streams": {f"s{clear}[bold]x[/bold]": {"effective_rank": 4.0}},
            "errors": {f"boom{clear}": 2},
            "alerts": [{"name": f"Repwatch{title}Collapse", "stream": f"s{clear}[bold]x[/bold]",
                        "scope": "stream", "severity": "critical", "signal": "x", "value": 0.1,
                        "since_step": 2}]}
    console = Console(record=True, force_terminal=True, width=200, color_system="standard")
    console.print(build_table([snap], {}))
    out = console.export_text(styles=True)
    assert "\x1b]" not in out and clear not in out and "\x07" not in out
    assert "[bold]x[/bold]" in out                     # markup shown as typed, not applied
    assert "\\x1b" in out                               # the control character, made visible

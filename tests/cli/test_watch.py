"""The terminal view (monitor/cli/watch.py, `repwatch watch`, the demo's live table)."""

from __future__ import annotations

import http.server
import json
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


# ---- a broken or hostile server ---------------------------------------------------------------

class _Fake:
    """A stand-in server: answers GET ``path`` (with the query string) from ``routes``
    (raw path → JSON-ready value, or bytes sent as they are; 404 otherwise) and records the
    raw request paths it was asked for."""

    def __init__(self, routes: dict[str, Any]) -> None:
        self.routes = routes
        self.paths: list[str] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                fake.paths.append(self.path)
                path = self.path.split("?")[0]
                if path not in fake.routes:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                answer = fake.routes[path]
                body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Fake:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def _snap(run: Any = "r", **fields: Any) -> dict[str, Any]:
    """A well-formed snapshot dict of one stream, with ``fields`` replacing its values."""
    return {"run": run, "step": 3, "time": 0.0,
            "streams": {"s": {"effective_rank": 4.0, "embedding_std_ratio": 0.5}},
            "counters": {"s": {"samples": 64}}, "dropped": {}, "errors": {}, "alerts": [],
            **fields}


def _watch_here(url: str, capsys: pytest.CaptureFixture[str], *, run: str | None = None,
                **kw: Any) -> tuple[int, str, str]:
    """``watch(url, once=True)`` in this process; (exit code, table text, stderr)."""
    from io import StringIO

    from monitor.cli.watch import watch

    buf = StringIO()
    rc = watch(url, run=run, once=kw.pop("once", True), interval=0.01,
               console=Console(file=buf, width=160), **kw)
    return rc, buf.getvalue(), capsys.readouterr().err


def _one_line_error(rc: int, err: str) -> str:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repwatch watch: error: "), err
    return lines[0]


@pytest.mark.parametrize(("name", "segment"), [
    ("a\x1b]0;pwned\x07b", "a%1B%5D0%3Bpwned%07b"), ("a\nb", "a%0Ab"), ("\x00", "%00"),
    ("a/b?c#d e%2F", "a%2Fb%3Fc%23d%20e%252F"), ("..", "%2E%2E"),
    ("team/exp-1.2", "team%2Fexp-1.2")])
def test_watch_quotes_run_names_in_urls_and_shows_them_visibly(
        name: str, segment: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A run name that is not URL-safe (control characters, ``/?#``, a space, ``..``) is
    quoted for its history request, and shown with its control characters made visible."""
    from monitor.cli.watch import shown

    hist_path = f"/v1/runs/{segment}/history"
    with _Fake({"/v1/runs": [_snap(name)], hist_path: [_snap(name, step=1), _snap(name)]}) as f:
        rc, text, err = _watch_here(f.url, capsys)
        assert rc == 0, err
        assert any(p.startswith(hist_path + "?") for p in f.paths), f.paths
        assert shown(name) in text and "\x1b" not in text and "\x07" not in text
        spark = "".join(c for c in _row(text, "s") if c in SPARK_CHARS)
        assert len(spark) == 2                          # the history was read
        rc, text, err = _watch_here(f.url, capsys, run=name)
        assert rc == 0 and f"run {shown(name)}" in text, err


NOT_RUNS: dict[str, Any] = {
    "malformed JSON": b'[{"run": "r"',
    "not UTF-8": b'["\xff\xfe"]',
    "a number": 42, "a string": "runs", "null": None, "a dict": {"runs": [_snap()]},
    "a list of lists": [[1, 2]], "a list of strings": ["r"], "no run key": [{"step": 1}],
    "an int run name": [_snap(5)], "a null run name": [_snap(None)],
    "a dict run name": [_snap({"a": 1})], "a list run name": [_snap(["r"])],
    "a 5000-digit step": b'[{"run": "r", "step": ' + b"9" * 5000 + b"}]",
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "streams a list": [_snap(streams=[1, 2])],
    "stream values a list": [_snap(streams={"s": [4.0]})],
    "layers a string": [_snap(layers="x")],
    "alerts a string": [_snap(alerts="firing")],
    "alerts a dict": [_snap(alerts={"name": "x"})],
    "an alert not a dict": [_snap(alerts=[1])],
    "an alert without a name": [_snap(alerts=[{"stream": "s"}])],
    "an int alert name": [_snap(alerts=[{"name": 7, "stream": "s"}])],
    "counters a list": [_snap(counters=[1])],
    "a counter not a dict": [_snap(counters={"s": 5})],
    "errors a list": [_snap(errors=[1])],
    "dropped a string": [_snap(dropped="x")],
}


@pytest.mark.parametrize("answer", list(NOT_RUNS.values()), ids=list(NOT_RUNS))
def test_watch_on_a_malformed_answer_is_one_line_and_exit_2(
        answer: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with _Fake({"/v1/runs": answer}) as f:
        rc, text, err = _watch_here(f.url, capsys)
    assert text == ""
    _one_line_error(rc, err)


SHOWN_SAFELY: dict[str, Any] = {
    "huge ints": _snap(step=10**400, streams={"s": {"effective_rank": 10**400,
                                                     "embedding_std_ratio": -10**400}},
                       counters={"s": {"samples": 10**400}}, dropped={"x": 10**400},
                       errors={"x": 10**400}),
    "huge floats": _snap(streams={"s": {"effective_rank": 1e308, "embedding_std_ratio": 2e-308}},
                         counters={"s": {"samples": 1.7e308}, "t": {"samples": 1.7e308}}),
    "markup and escapes in values": _snap(step="[/bold]\x1b[2J", errors={"e": "[/x]\x07"},
                                          alerts=[{"name": "Repwatch[/b]", "stream": "s",
                                                   "since_step": "\x1b]0;t\x07",
                                                   "signal": ["x"], "value": "[/y]"}]),
    "non-number values": _snap(streams={"s": {"effective_rank": "4", "embedding_std_ratio":
                                              {"a": 1}}}, counters={"s": {"samples": [1]}}),
    "nulls": _snap(streams={"s": None}, counters=None, dropped=None, errors=None, alerts=None),
}


@pytest.mark.parametrize("url", ["http://[::1", "http://127.0.0.1:1\x1b[2J", "ftp://x",
                                 "http://127.0.0.1:99999"])
def test_watch_invalid_url_is_one_line_and_exit_2(url: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc, text, err = _watch_here(url, capsys)
    assert text == "" and "\x1b" not in _one_line_error(rc, err)


@pytest.mark.parametrize("snap", list(SHOWN_SAFELY.values()), ids=list(SHOWN_SAFELY))
def test_watch_shows_odd_values_safely(snap: dict[str, Any],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Values of odd types or sizes are shown (as text, control characters visible) or as
    ``–``, never a traceback; a malformed history only loses its sparkline points."""
    with _Fake({"/v1/runs": [snap],
                "/v1/runs/r/history": [snap, 5, [], {"streams": [1]}, {"run": "r"}]}) as f:
        rc, text, err = _watch_here(f.url, capsys)
    assert rc == 0, err
    assert "\x1b" not in text and "\x07" not in text
    assert "run r" in text


def test_watch_keeps_polling_when_a_later_answer_is_malformed(
        capsys: pytest.CaptureFixture[str]) -> None:
    """In the live view a malformed answer after a good one is a caption note, not a crash."""
    answers = iter([[_snap(streams=[1])], b"{", [[1]], [_snap(alerts="x")]])
    calls: list[float] = []

    def sleep(seconds: float) -> None:
        calls.append(seconds)
        try:
            f.routes["/v1/runs"] = next(answers)
        except StopIteration:
            raise KeyboardInterrupt from None

    with _Fake({"/v1/runs": [_snap()]}) as f:
        rc, text, err = _watch_here(f.url, capsys, once=False, sleep=sleep)
    assert rc == 0, err
    assert len(calls) == 5
    assert "retrying every" in text


@pytest.mark.e2e
def test_watch_once_piped_shows_control_characters_visibly() -> None:
    """`repwatch watch --once` into a pipe: a hostile run name reaches stdout made visible and
    the command exits 0 (the history request quoted the name)."""
    name = "a\x1b]0;pwned\x07b\nc"
    with _Fake({"/v1/runs": [_snap(name)], "/v1/runs/a%1B%5D0%3Bpwned%07b%0Ac/history":
                [_snap(name)]}) as f:
        out = _watch(f.url, "--once", timeout=60)
        assert out.returncode == 0, out.stderr
        assert any("%1B%5D0%3Bpwned%07b%0Ac/history?" in p for p in f.paths), f.paths
        assert "\x1b" not in out.stdout and "\x07" not in out.stdout
        assert "a\\x1b]0;pwned\\x07b\\nc" in out.stdout
        bad = _watch(f.url, "--once", "--run", name, timeout=60)
        assert bad.returncode == 0, bad.stderr
        f.routes["/v1/runs"] = [_snap(7)]
        bad = _watch(f.url, "--once", timeout=60)
    _one_line_error(bad.returncode, bad.stderr)
    assert bad.stdout == ""


def test_watch_once_into_a_pipe_is_not_wrapped(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`repwatch watch URL --once | ...` (issue 19): stdout is not a terminal, so no line of
    the table is folded or wrapped at 80 columns ("strea/m"), whatever $COLUMNS says."""
    from monitor.cli.watch import watch

    monkeypatch.setenv("COLUMNS", "80")
    stream = "student_projector_stream_of_the_second_view"
    layer = "encoder.blocks.11.mlp.activation_function"
    alert = {"name": "RepwatchDimensionalCollapse", "stream": stream, "scope": "stream",
             "since_step": 120, "signal": "effective_rank_peak_ratio", "value": 0.21,
             "severity": "warning"}
    snap = _snap("a-run-with-a-rather-long-name",
                 streams={stream: {"effective_rank": 12.5, "embedding_std_ratio": 0.82,
                                   "low_quality_samples_ratio": 0.1},
                          "backbone": {"effective_rank": 30.1, "embedding_std_ratio": 0.9}},
                 layers={layer: {"effective_rank": 40.0, "dormant_units_ratio{tau=0.1}": 0.3}},
                 counters={stream: {"samples": 353280}, "backbone": {"samples": 353280}},
                 alerts=[alert])
    hist = "/v1/runs/a-run-with-a-rather-long-name/history"
    with _Fake({"/v1/runs": [snap], hist: [_snap(snap["run"], step=1), snap]}) as f:
        rc = watch(f.url, once=True, interval=0.01)      # the console of the command itself
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) > 80          # it did not fit into 80 columns
    header = next(line for line in lines if "step" in line.split())
    assert "stream/layer" in header and "alerts" in header
    row = _row(out, stream)                               # the stream's row is one line,
    assert "12.5" in row and "0.82" in row and "DimensionalCollapse" in row
    assert "30.1" in _row(out, "backbone")
    assert "0.3" in _row(out, layer)                      # the layer's too
    firing = [line for line in lines if "firing:" in line]
    assert len(firing) == 1 and firing[0].strip().endswith("(effective_rank_peak_ratio 0.21)")
    assert any(line.startswith("repwatch · ") and "run a-run-with-a-rather-long-name" in line
               for line in lines)

"""End to end: repwatch → a real Prometheus (the rendered rules) → a real Alertmanager → a webhook.

Everything runs on 127.0.0.1 with free ports and its own temporary directory, and is torn down
by the test. The rules are those of ``render_rules()`` with only the durations (``for``,
``keep_firing_for``) shortened to seconds; the expressions are asserted to be identical. The
Alertmanager config is the shipped ``deploy/alertmanager/alertmanager.yml`` with the webhook URL
pointed at a receiver inside the test and the waits shortened.

Two demos run side by side, scraped by the same Prometheus:
``repwatch demo --collapse`` (SimSiam without stop-gradient) → the
``RepwatchRepresentationCollapse`` notification must reach the webhook within a bounded time;
the healthy demo (stop-gradient kept) → no collapse notification for its run over a window at
least as long as the collapse run needed and past the end of its training, while Prometheus
demonstrably scraped it with the rules' sample gate open. ``RepwatchDown`` (targets before they
start / after they stop) and notifications of the other run are expected and ignored: the check
takes only collapse alerts that carry the healthy run's ``run`` label or scrape ``instance``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from exporters.rules import render_rules

ROOT = Path(__file__).resolve().parents[1]
AM_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"

COLLAPSE_ALERTS = ("RepwatchRepresentationCollapse", "RepwatchDimensionalCollapse")
SHORT_FOR = "3s"            # every `for:` of the rendered rules, for a bounded test
SHORT_KEEP = "5s"           # every `keep_firing_for:`
# Demo launch → collapse notification at the webhook: about 12 s on 2 idle cores. A bound, not
# an expectation: the waits poll a condition, so only a failing run waits this long (on a
# loaded 2-core machine the demo alone once took minutes before it trained on one thread).
ALERT_DEADLINE_S = 300.0
READY_DEADLINE_S = 120.0    # Prometheus / Alertmanager ready
DEMO_STEPS = 400


# ----------------------------------------------------------------------------- helpers


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together while picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<{path}: {exc}>"
    return text[-chars:]


@dataclass
class _Proc:
    """A child process whose stdout+stderr go to a log file; stopped with terminate, then kill."""

    name: str
    log: Path
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def report(self) -> str:
        rc = self.proc.poll()
        state = "running" if rc is None else f"exited {rc}"
        return f"----- {self.name} ({state}), tail of {self.log}:\n{_tail(self.log)}"


def _spawn(stack: ExitStack, name: str, cmd: list[str], log: Path,
           cwd: Path | None = None) -> _Proc:
    fh = stack.enter_context(log.open("wb"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = _Proc(name, log, subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, cwd=cwd, env=env))
    stack.callback(proc.stop)
    return proc


@dataclass
class _Webhook:
    """Alertmanager webhook receiver: records every POSTed payload with its arrival time."""

    received: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/alerts"

    def alerts(self, since: float = 0.0) -> list[tuple[float, dict[str, Any]]]:
        """(arrival time, alert) of every alert in the payloads received at or after ``since``."""
        with self.lock:
            return [(t, a) for t, p in self.received if t >= since for a in p.get("alerts", [])]

    def payloads(self) -> list[dict[str, Any]]:
        with self.lock:
            return [p for _, p in self.received]


@contextmanager
def _webhook() -> Iterator[_Webhook]:
    hook = _Webhook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                payload = json.loads(body)
            except ValueError:
                self.send_response(400)
                self.end_headers()
                return
            with hook.lock:
                hook.received.append((time.monotonic(), payload))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    hook.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=hook.server.serve_forever, name="webhook", daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        hook.server.shutdown()
        hook.server.server_close()
        thread.join(timeout=10)


def _wait(pred: Callable[[], bool], timeout: float, what: str, diag: Callable[[], str],
          interval: float = 0.25) -> float:
    """Poll ``pred`` until true (bounded in time and count); seconds waited, else fail with
    ``diag()``."""
    start = time.monotonic()
    for _ in range(int(timeout / interval) + 1):
        if pred():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            break
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{diag()}")


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5)
    r.raise_for_status()
    return r.json()["data"]["result"]


def short_rules() -> dict[str, Any]:
    """``render_rules()`` with every ``for``/``keep_firing_for`` shortened, nothing else changed."""
    rules = copy.deepcopy(render_rules())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = SHORT_FOR
            if "keep_firing_for" in rule:
                rule["keep_firing_for"] = SHORT_KEEP
    return rules


def alertmanager_config(webhook_url: str) -> dict[str, Any]:
    """The shipped Alertmanager config, webhook pointed at the test receiver, waits of 1 s."""
    cfg = yaml.safe_load(AM_CONFIG.read_text())
    for route in [cfg["route"], *cfg["route"].get("routes", [])]:
        for key in ("group_wait", "group_interval"):
            if key in route:
                route[key] = "1s"
    for receiver in cfg["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = webhook_url
    return cfg


# ----------------------------------------------------------------------------- config checks


def test_short_rules_keep_the_rendered_expressions() -> None:
    full, short = render_rules(), short_rules()
    pairs = list(zip(full["groups"][0]["rules"], short["groups"][0]["rules"], strict=True))
    assert pairs, "render_rules() rendered no rules"
    for a, b in pairs:
        assert (a["alert"], a["expr"], a["labels"], a["annotations"]) == \
               (b["alert"], b["expr"], b["labels"], b["annotations"])
        assert set(a) == set(b)
        assert b.get("for", SHORT_FOR) == SHORT_FOR and b.get("keep_firing_for",
                                                              SHORT_KEEP) == SHORT_KEEP
    assert any(a.get("for") not in (None, SHORT_FOR) for a, _ in pairs), \
        "the shipped rules' durations should differ from the test's shortened ones"


@pytest.mark.e2e
def test_shipped_alertmanager_config_routes_per_alert_run_stream() -> None:
    cfg = yaml.safe_load(AM_CONFIG.read_text())
    assert cfg["route"]["group_by"] == ["alertname", "run", "stream"]
    receivers = {r["name"]: r for r in cfg["receivers"]}
    hooks = receivers[cfg["route"]["receiver"]]["webhook_configs"]
    assert hooks and all(h["url"].startswith("http") for h in hooks)
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool not installed (Debian package prometheus-alertmanager)")
    out = subprocess.run([amtool, "check-config", str(AM_CONFIG)], check=False,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# ----------------------------------------------------------------------------- the stack


@pytest.mark.e2e
@pytest.mark.slow
def test_collapse_alert_reaches_webhook_and_healthy_run_stays_quiet(
        tmp_path: Path, prometheus: str, alertmanager: str, promtool: str) -> None:
    am_port, prom_port, collapse_port, healthy_port = _free_ports(4)
    prom_url, am_url = f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{am_port}"
    procs: list[_Proc] = []

    with ExitStack() as stack:
        hook = stack.enter_context(_webhook())

        def diag() -> str:
            got = [f"  {a['status']} {a['labels']}" for _, a in hook.alerts()]
            try:
                pending = json.dumps(httpx.get(f"{prom_url}/api/v1/alerts", timeout=5)
                                     .json()["data"]["alerts"], indent=1)[-3000:]
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                pending = f"<{exc}>"
            return "\n".join(["webhook received:", *(got or ["  nothing"]),
                              f"Prometheus /api/v1/alerts: {pending}",
                              *(p.report() for p in procs)])

        # Alertmanager: the shipped config with the test's webhook and 1 s waits.
        am_dir = tmp_path / "alertmanager"
        am_dir.mkdir()
        am_cfg = am_dir / "alertmanager.yml"
        am_cfg.write_text(yaml.safe_dump(alertmanager_config(hook.url), sort_keys=False))
        if shutil.which("amtool"):
            check = subprocess.run(["amtool", "check-config", str(am_cfg)], check=False,
                                   capture_output=True, text=True, timeout=60)
            assert check.returncode == 0, check.stdout + check.stderr
        procs.append(_spawn(stack, "alertmanager", [
            alertmanager, f"--config.file={am_cfg}", f"--storage.path={am_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address=",
            "--log.level=info"], am_dir / "alertmanager.log"))

        # Prometheus: the rendered rules (durations shortened), 1 s scrape/evaluation.
        prom_dir = tmp_path / "prometheus"
        prom_dir.mkdir()
        (prom_dir / "rules.yml").write_text(yaml.safe_dump(short_rules(), sort_keys=False))
        prom_cfg = prom_dir / "prometheus.yml"
        prom_cfg.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": ["rules.yml"],
            "alerting": {"alertmanagers": [
                {"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
            "scrape_configs": [{"job_name": "repwatch", "static_configs": [{"targets": [
                f"127.0.0.1:{collapse_port}", f"127.0.0.1:{healthy_port}"]}]}],
        }, sort_keys=False))
        check = subprocess.run([promtool, "check", "config", str(prom_cfg)], check=False,
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        assert re.search(r"SUCCESS: \d+ rules found", check.stdout), check.stdout
        procs.append(_spawn(stack, "prometheus", [
            prometheus, f"--config.file={prom_cfg}", f"--storage.tsdb.path={prom_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}", "--rules.alert.resend-delay=1s",
            "--log.level=info"], prom_dir / "prometheus.log", cwd=prom_dir))

        def demo(name: str, port: int, *extra: str) -> _Proc:
            proc = _spawn(stack, name, [
                sys.executable, "-m", "monitor.cli", "demo", *extra, "--steps", str(DEMO_STEPS),
                "--port", str(port), "--linger", "120", "--device", "cpu"],
                tmp_path / f"{name}.log", cwd=ROOT)
            procs.append(proc)
            return proc

        # Both runs at once: their torch imports overlap the servers' start.
        t_start = time.monotonic()
        collapse = demo("demo-collapse", collapse_port, "--collapse")
        healthy = demo("demo", healthy_port)
        _wait(lambda: _ready(f"{am_url}/-/ready"), READY_DEADLINE_S, "Alertmanager ready", diag)
        _wait(lambda: _ready(f"{prom_url}/-/ready"), READY_DEADLINE_S, "Prometheus ready", diag)

        def collapse_notified() -> bool:
            return any(a["labels"].get("alertname") == "RepwatchRepresentationCollapse"
                       and a["labels"].get("run") == "demo-collapse" and a["status"] == "firing"
                       for _, a in hook.alerts())

        _wait(collapse_notified, ALERT_DEADLINE_S, "RepwatchRepresentationCollapse at the webhook",
              diag)
        time_to_alert = time.monotonic() - t_start
        alert = next(a for _, a in hook.alerts()
                     if a["labels"].get("alertname") == "RepwatchRepresentationCollapse")
        labels, notes = alert["labels"], alert["annotations"]
        assert labels["severity"] == "critical", alert
        assert labels["stream"] in ("backbone", "projector"), alert
        assert labels["job"] == "repwatch" and labels["instance"] == f"127.0.0.1:{collapse_port}"
        shipped = next(r for r in render_rules()["groups"][0]["rules"]
                       if r["alert"] == "RepwatchRepresentationCollapse")
        assert notes["runbook_url"] == shipped["annotations"]["runbook_url"]
        assert notes["runbook_url"].endswith("#repwatchrepresentationcollapse")
        assert notes["summary"] == shipped["annotations"]["summary"]
        assert "demo-collapse" in notes["description"] and "{{" not in notes["description"]
        payload = next(p for p in hook.payloads() if any(
            a["labels"].get("alertname") == "RepwatchRepresentationCollapse"
            for a in p["alerts"]))
        assert set(payload["groupLabels"]) == {"alertname", "run", "stream"}, payload
        collapse.stop()
        notified = sorted({(a["labels"]["alertname"], a["labels"].get("stream", ""))
                           for _, a in hook.alerts() if a["labels"].get("run") == "demo-collapse"})
        print(f"\ncollapse: notification at the webhook {time_to_alert:.1f} s after the demo "
              f"was launched ({labels['stream']}); notified for that run: {notified}")

        # The healthy run, watched at least as long as the collapse run needed.
        def healthy_trained() -> bool:
            return "trained " in _tail(healthy.log, 100_000)

        _wait(healthy_trained, ALERT_DEADLINE_S, "the healthy demo to finish training", diag)
        trained_after = time.monotonic() - t_start
        # A condition holding at the end of training would notify within for + eval + scrape +
        # group_wait (~6 s); watch for that and for the whole collapse time, whichever is longer.
        window = max(time_to_alert, trained_after + 10.0)
        time.sleep(max(0.0, t_start + window - time.monotonic()))

        bad = [(t - t_start, a) for t, a in hook.alerts(since=t_start)
               if a["labels"].get("alertname") in COLLAPSE_ALERTS
               and (a["labels"].get("run") == "demo"
                    or a["labels"].get("instance") == f"127.0.0.1:{healthy_port}")]
        assert not bad, f"healthy run notified a collapse alert: {bad}\n{diag()}"
        # The check could not fail if Prometheus never saw the healthy run with the gate open.
        samples = _query(prom_url, 'count_over_time(repwatch_window_samples{run="demo"}[10m])')
        gate_open = _query(prom_url, 'count_over_time((repwatch_window_samples{run="demo"} '
                                     '>= 256)[10m:1s])')
        assert samples and gate_open, f"Prometheus never scraped the healthy run\n{diag()}"
        assert max(float(s["value"][1]) for s in gate_open) >= 10, gate_open
        pending = _query(prom_url, 'ALERTS{run="demo",alertname=~"'
                                   + "|".join(COLLAPSE_ALERTS) + '"}')
        # the minima of the signals the collapse rules read, for the record
        minima = {sig: [(s["metric"]["stream"], f"{float(s['value'][1]):.3g}") for s in _query(
                      prom_url, f'min_over_time(repwatch_{sig}{{run="demo"}}[10m])')]
                  for sig in ("embedding_std_ratio", "embedding_variance_ratio",
                              "effective_rank", "effective_rank_baseline_ratio",
                              "effective_rank_peak_ratio")}
        print(f"healthy: trained after {trained_after:.1f} s, watched {window:.1f} s; gate-open "
              f"evaluations per stream {[s['value'][1] for s in gate_open]}; minima {minima}; "
              f"collapse ALERTS now {pending}")
        assert not pending, f"collapse alert pending/firing for the healthy run\n{diag()}"

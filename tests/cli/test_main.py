"""`repwatch demo` as a user runs it: a real process serving /metrics that promtool accepts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.subproc import run_python

ROOT = Path(__file__).resolve().parents[1]


def _scrape_until_alert(url: str, deadline: float) -> str:
    text = ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"{url}/metrics", timeout=5).text
        except httpx.HTTPError:
            text = ""
        if re.search(r'repwatch_alerts_firing\{alertname="RepwatchRepresentationCollapse",'
                     r'run="demo-collapse",severity="critical",stream="projector"\} 1\.0', text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"collapse alert not seen on {url}/metrics; last scrape:\n{text[-2000:]}")


@pytest.mark.e2e
@pytest.mark.slow
def test_demo_serves_metrics_that_pass_promtool(promtool: str) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor.cli", "demo", "--collapse", "--steps", "400",
         "--port", "0", "--linger", "60", "--device", "cpu"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        url = None
        start = time.monotonic()
        while url is None and time.monotonic() - start < 120:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            url = m.group(1) if m else None
        assert url, "the demo did not print its URL"
        text = _scrape_until_alert(url, time.monotonic() + 240)
        check = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                               capture_output=True, timeout=60)
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
        page = httpx.get(f"{url}/", timeout=5).text           # the dashboard (tests/e2e)
        assert "<title>repwatch dashboard</title>" in page
        runs = httpx.get(f"{url}/v1/runs", timeout=5).json()
        assert "RepwatchRepresentationCollapse" in {a["name"] for a in runs[0]["alerts"]}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.e2e
def test_cli_help_and_bad_arguments() -> None:
    out = subprocess.run([sys.executable, "-m", "monitor.cli", "demo", "--help"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "--collapse-at" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "monitor.cli", "demo", "--steps", "many"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "invalid int value" in bad.stderr


@pytest.mark.slow
@pytest.mark.e2e
def test_plasticity_scenario_demo_runs() -> None:
    """`repwatch demo --scenario plasticity` prints per-task accuracy and the dormant fraction;
    on this short run (12 tasks) the plasticity alert fires (seed 0: at step 700, as on the
    detection benchmark's plain run, docs/detection.md)."""
    out = subprocess.run([sys.executable, "-m", "monitor.cli", "demo", "--scenario", "plasticity",
                          "--tasks", "12", "--steps-per-task", "100", "--port", "-1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(re.findall(r"^task +\d+: training accuracy [01]\.\d\d", out.stdout, re.M)) == 12
    assert re.search(r"layer 1: dormant\(0\.1\) +0\.\d+", out.stdout)
    assert "RepwatchPlasticityLoss first fired at step" in out.stdout
    assert "first fired at step None" not in out.stdout


@pytest.mark.e2e
def test_building_the_command_line_does_not_load_torch() -> None:
    """`repwatch serve` (the torch-free sidecar image) parses its command line without torch;
    `select`'s ranking code is imported only when `select` runs."""
    code = ("import sys; from monitor import cli; import argparse\n"
            "try:\n    cli.main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "NO-TORCH"


@pytest.mark.parametrize("argv,threads", [([], 1), (["--threads", "2"], 2)])
def test_demo_trains_on_few_threads(argv: list[str], threads: int,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's models are tiny: it trains on one torch thread unless told otherwise (on a
    busy 2-core machine the default thread count made 700 steps take 188 s instead of 17 s)."""
    import torch

    from monitor.tools import demo
    from monitor.cli import main

    seen: list[int] = []

    def record(**kwargs: object) -> demo.DemoResult:
        seen.append(torch.get_num_threads())
        return demo.DemoResult(snapshots=[object()])  # type: ignore[list-item]

    monkeypatch.setattr(demo, "run_demo", record)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        assert main(["demo", "--steps", "1", "--port", "-1", *argv]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [threads]

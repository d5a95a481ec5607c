"""`repwatch report LOG.jsonl [...] -o PAGE.html` (monitor/cli/report.py): one self-contained
offline page from the JSONL history of a run, or of several runs overlaid. The page in a real
browser: tests/e2e/test_report_page.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from monitor.cli.main import main
from monitor.cli.report import (CSP, ReportRun, _thin, drawing_code, load_runs, render_html)
from monitor.snapshot import Alert, Snapshot
from tests.test_history import COLLAPSE, write_log

APP_JS = Path(__file__).resolve().parents[2] / "monitor" / "server" / "web" / "app.js"
SVG_NS = "http://www.w3.org/2000/svg"


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run that collapses at step 20 and a healthy one, both named ``exp``."""
    d = tmp_path_factory.mktemp("logs")
    write_log(d / "collapse.jsonl", collapse_at=20)
    write_log(d / "healthy.jsonl", collapse_at=None, seed=1)
    return {"collapse": d / "collapse.jsonl", "healthy": d / "healthy.jsonl"}


def page_data(page: str) -> dict[str, Any]:
    """The JSON the page embeds."""
    m = re.search(r'<script id="repwatch-data" type="application/json">(.*?)</script>', page, re.S)
    assert m, "no embedded data"
    return json.loads(m.group(1))


def assert_offline(page: str) -> None:
    """Nothing in the page refers to the network: no http(s) URL but the SVG namespace, no
    src= / external stylesheet / @import / url(), and a CSP that forbids any request."""
    urls = set(re.findall(r"https?://[^\s\"'<>)]*", page))
    assert urls <= {SVG_NS}, urls
    assert not re.search(r"<script[^>]*\ssrc\s*=", page, re.I)
    assert not re.search(r"<link[^>]*rel=[\"']?stylesheet", page, re.I)
    assert not re.search(r"@import|url\(", page, re.I)
    assert not re.search(r"\bfetch\(|XMLHttpRequest|EventSource|WebSocket", page)
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in page
    assert "default-src 'none'" in CSP


def test_report_of_one_run(logs: dict[str, Path], tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.html"
    assert main(["report", str(logs["collapse"]), "-o", str(out)]) == 0
    assert f"wrote {out}: 1 run(s) (exp), 20 publishes" in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    assert_offline(page)
    assert page.count("<script") == 2                 # the data and the code, both inline
    assert drawing_code() in page                     # the dashboard's own chart renderer
    data = page_data(page)
    (run,) = data["runs"]
    assert run["label"] == "exp" and run["steps"] == list(range(2, 41, 2))
    assert run["publishes"] == run["shown"] == 20
    rank = run["groups"]["stream"]["z"]["effective_rank"]
    assert len(rank) == 20 and rank[0] > 20 and rank[-1] < 2       # healthy, then collapsed
    assert run["groups"]["stream"]["z"]["samples"][-1] == 40 * 256   # counters: stream signals
    assert run["samples"] == 40 * 256 and run["samples_by"] == {"z": 40 * 256}
    assert any("dormant_units_ratio{tau=0.1}" in sigs for sigs in run["groups"]["layer"].values())
    collapse = [a for a in run["alerts"] if a["name"] == COLLAPSE]
    assert len(collapse) == 1 and collapse[0]["stream"] == "z"
    assert collapse[0]["resolved_step"] is None and collapse[0]["since_step"] > 20
    assert run["spectra"] == {}                       # the Monitor's log has none


def test_report_compares_two_runs(logs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp.html"
    assert main(["report", str(logs["collapse"]), str(logs["healthy"]), "-o", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert_offline(page)
    runs = page_data(page)["runs"]
    # both runs are named exp: the file names tell them apart
    assert [r["label"] for r in runs] == ["exp (collapse.jsonl)", "exp (healthy.jsonl)"]
    assert [bool(r["alerts"]) for r in runs] == [True, False]
    assert "<title>exp (collapse.jsonl) vs exp (healthy.jsonl)</title>" in page
    out2 = tmp_path / "cmp2.html"
    assert main(["report", str(logs["collapse"]), str(logs["healthy"]), "-o", str(out2),
                 "--label", "no stop-grad", "--label", "<b>base</b>", "--title", "A & B"]) == 0
    page2 = out2.read_text(encoding="utf-8")
    assert [r["label"] for r in page_data(page2)["runs"]] == ["no stop-grad", "<b>base</b>"]
    assert "<b>base</b>" not in page2 and "<title>A &amp; B</title>" in page2


def test_report_errors(logs: dict[str, Path], tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "missing.jsonl"), "-o", str(out)]) == 2
    assert "repwatch report: error:" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    lines = logs["collapse"].read_text().splitlines()
    bad.write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    assert main(["report", str(bad), "-o", str(out)]) == 2
    assert "bad.jsonl:2: not a repwatch snapshot line" in capsys.readouterr().err
    assert not out.exists()
    assert main(["report", str(bad), "-o", str(out), "--skip-malformed"]) == 0
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["report", str(empty), "-o", str(out)]) == 2
    assert "no snapshots" in capsys.readouterr().err
    assert main(["report", str(logs["collapse"]), "--label", "a", "--label", "b",
                 "-o", str(out)]) == 2
    assert "2 --label given for 1 runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(logs["collapse"]), "--max-points", "-1"])


def test_the_drawing_code_is_cut_from_the_dashboard() -> None:
    code = drawing_code()
    assert code in APP_JS.read_text(encoding="utf-8")
    for fn in ("function drawChart(", "function card(", "function legend(", "function fmt("):
        assert fn in code, fn


def _alerting(step: int, firing: bool) -> Snapshot:
    alerts = [Alert(name=COLLAPSE, stream="z", severity="critical", value=0.0, signal="x",
                    summary="", description="", runbook_url="", since_step=505)] if firing else []
    return Snapshot(run="r", step=step, time=float(step), alerts=alerts,
                    streams={"z": {"effective_rank": float(step)}})


def test_long_runs_are_thinned_keeping_alert_changes() -> None:
    snaps = [_alerting(s, 505 <= s < 703) for s in range(1, 1001)]
    kept = [s.step for s in _thin(snaps, 100)]
    assert 100 <= len(kept) <= 106 and kept[0] == 1 and kept[-1] == 1000
    assert {504, 505, 702, 703} <= set(kept)          # fired, resolved, and the publish before
    assert _thin(snaps, 0) == snaps
    page = render_html([ReportRun("r", "x.jsonl", snaps)], max_points=100)
    (run,) = page_data(page)["runs"]
    assert run["publishes"] == 1000 and run["shown"] == len(kept)
    assert [(a["since_step"], a["resolved_step"]) for a in run["alerts"]] == [(505, 703)]


def test_a_log_with_several_runs_and_ranks(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    snaps = [Snapshot(run=run, step=step, time=0.0, rank=rank, streams={"z": {"x": 1.0}})
             for step in (1, 2) for run, rank in (("a", None), ("b", 0), ("b", 1))]
    path.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in snaps))
    assert [r.label for r in load_runs([path])] == ["a", "b rank 0", "b rank 1"]
    assert [r.label for r in load_runs([path, path])][:2] == ["a (mixed.jsonl)",
                                                              "b rank 0 (mixed.jsonl)"]
    assert [r.label for r in load_runs([path, path])][3] == "a (mixed.jsonl) #2"

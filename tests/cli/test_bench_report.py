"""`repwatch bench`'s report (issue 19): missed targets are marked, `--fail-on-miss` exits 1,
and the help of `--quick` says what it costs. The figures are made up here (no timing)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from monitor.cli import main as cli_main
from monitor.tools import bench


def _result() -> dict[str, Any]:
    rows = [bench._row("update_throughput", 2.0, 8.0, 0.25, ">= 0.70", "rows*d^2/s", {"d": 256}),
            bench._row("publish_vs_eigvalsh", 1.2, 1.0, 1.2, "<= 1.5", "s", {"d": 1024}),
            bench._row("training_overhead", 1.05, 1.0, 1.05, "<= 1.03", "s/step",
                       {"workload": "cnn", "d": 128}),
            bench._row("memory_per_stream", 1.0, 1.0, 1.0, "1.00 ± 0.02", "bytes", {"d": 256}),
            bench._row("naive_item", 3.0, 1.0, 3.0, "> 1 (speed-up)", "s/interval", {"d": 256})]
    return {"machine": {"device": "cpu", "cpu": "test", "cores": 2, "threads": 1,
                        "torch": "x", "date": "today"},
            "quick": True, "command": "repwatch bench", "seconds": 1.0, "figures": rows}


def _text(table: Any) -> str:
    console = Console(record=True, width=200, file=open(os.devnull, "w"))
    console.print(table)
    console.file.close()
    return console.export_text()


def test_each_figure_says_whether_it_met_its_target() -> None:
    result = _result()
    assert [r["met"] for r in result["figures"]] == [False, True, False, True, True]
    assert bench.target_met("<= 1.01 (GPU)", 1.02) is False
    assert bench.target_met("1.00 ± 0.02", 0.97) is False
    assert bench.target_met("<= 1.5", float("nan")) is None
    text = _text(bench.render_table(result))
    rows = {r["name"]: next(line for line in text.splitlines() if f" {r['name']} " in line)
            for r in result["figures"]}
    for missed in ("update_throughput", "training_overhead"):
        assert "MISSED" in rows[missed], rows[missed]
    for ok in ("publish_vs_eigvalsh", "memory_per_stream", "naive_item"):
        assert "MISSED" not in rows[ok] and " ok " in rows[ok], rows[ok]


def test_missed_targets_are_listed_and_fail_on_miss_exits_1(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: _result())
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--quick", "--out", str(out)]) == 0    # marked, exit 0 by default
    text = capsys.readouterr().out
    assert "MISSED 2 of 5 targets" in text
    assert "update_throughput d=256 0.250 (target >= 0.70)" in text
    assert "training_overhead (cnn) d=128 1.050 (target <= 1.03)" in text
    assert [r["met"] for r in json.loads(out.read_text())["figures"]] == [
        False, True, False, True, True]
    assert cli_main(["bench", "--quick", "--fail-on-miss"]) == 1
    assert "MISSED 2 of 5" in capsys.readouterr().out
    good = _result()
    good["figures"] = [r for r in good["figures"] if r["met"]]
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: good)
    assert cli_main(["bench", "--fail-on-miss"]) == 0
    assert "every target met (3 figures)" in capsys.readouterr().out


def test_quick_help_states_what_it_costs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    quick = text[text.rindex("--quick"):text.rindex("--device")]     # its entry under options
    assert "seconds" not in quick and "1 min" in quick, quick
    assert "--fail-on-miss" in text

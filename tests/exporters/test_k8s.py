"""exporters.k8s: the generated files of the Kubernetes component, their drift and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import monitor.alerts
from exporters import k8s
from exporters.grafana import render_dashboard
from exporters.rules import render_rules
from monitor.cli import main

ROOT = Path(__file__).resolve().parents[2]
COMPONENT = ROOT / k8s.COMPONENT_DIR


@pytest.fixture(autouse=True)
def _shipped_runbook_base(monkeypatch: pytest.MonkeyPatch) -> None:
    """Render as shipped, whatever REPWATCH_RUNBOOK_BASE this shell exports."""
    monkeypatch.setattr(monitor.alerts, "RUNBOOK_BASE", "docs/runbooks.md")


def test_shipped_files_match_what_the_command_renders() -> None:
    rendered = k8s.render_manifests()
    assert set(rendered) == {k8s.PROMETHEUS_RULE_FILE, k8s.DASHBOARD_FILE}
    for name, text in rendered.items():
        assert (COMPONENT / name).read_text() == text, (
            f"{k8s.COMPONENT_DIR}/{name} is stale; regenerate it with `repwatch manifests`")


def test_prometheus_rule_carries_the_rule_groups() -> None:
    rule = k8s.prometheus_rule()
    assert rule["kind"] == "PrometheusRule" and rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == render_rules()["groups"]
    # a parsed rules.yml works as the source too, and the runbook base reaches the annotations
    shipped = yaml.safe_load((ROOT / "deploy/prometheus/rules.yml").read_text())
    assert k8s.prometheus_rule(shipped)["spec"]["groups"] == shipped["groups"]
    based = k8s.prometheus_rule(runbook_base="https://runbooks.example/repwatch.md")
    urls = [r["annotations"]["runbook_url"] for g in based["spec"]["groups"] for r in g["rules"]]
    assert urls and all(u.startswith("https://runbooks.example/repwatch.md#") for u in urls)
    with pytest.raises(ValueError, match="groups"):
        k8s.prometheus_rule({"groups": []})


def test_dashboard_configmap_round_trips() -> None:
    cm = k8s.dashboard_configmap()
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"][k8s.DASHBOARD_KEY]) == render_dashboard()
    # the YAML text keeps the JSON byte for byte (a `|` block must not fold or strip it)
    loaded = yaml.safe_load(k8s.render_manifests()[k8s.DASHBOARD_FILE])
    assert loaded["data"][k8s.DASHBOARD_KEY] == cm["data"][k8s.DASHBOARD_KEY]
    own = {"title": "x", "panels": [{"id": 1, "title": "a\tb"}]}
    assert json.loads(k8s.dashboard_configmap(own)["data"][k8s.DASHBOARD_KEY]) == own


def test_cli_writes_the_files(tmp_path: Path) -> None:
    assert main(["manifests", "--out", str(tmp_path / "c")]) == 0
    for name, text in k8s.render_manifests().items():
        assert (tmp_path / "c" / name).read_text() == text


@pytest.mark.e2e
def test_importable_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "from exporters.k8s import render_manifests\n"
            "print(sorted(render_manifests()))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "prometheusrule.yaml" in proc.stdout


# ---- issue 19: `repwatch manifests` says where it writes and refuses a stray ./deploy --------


def test_component_is_the_generated_and_the_hand_written_files() -> None:
    present = {p.name for p in COMPONENT.iterdir() if p.is_file()}
    assert present == {*k8s.render_manifests(), *k8s.HAND_WRITTEN_FILES}


def test_manifests_outside_the_repository_needs_out(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["manifests"]) == 2                       # nothing written into ./deploy/...
    err = capsys.readouterr().err
    assert not (tmp_path / "deploy").exists()
    assert "--out" in err and all(f in err for f in k8s.HAND_WRITTEN_FILES), err
    out = tmp_path / "mine"
    assert main(["manifests", "--out", "mine", "--runbook-base", "https://wiki.example/rb"]) == 0
    cap = capsys.readouterr()
    # every path written, absolute; and a word on the component's other files
    assert cap.out.splitlines() == [f"wrote {(out / name).resolve()}"
                                    for name in k8s.render_manifests()]
    assert all(f in cap.err for f in k8s.HAND_WRITTEN_FILES), cap.err
    assert "runbook" not in cap.err                      # a base was given
    assert {p.name for p in out.iterdir()} == set(k8s.render_manifests())


def test_manifests_from_the_repository_root_writes_the_component(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Run from a checkout's root (here a copy of the component's hand-written files), it
    writes into deploy/k8s/components/repwatch and prints the absolute paths."""
    component = tmp_path / k8s.COMPONENT_DIR
    component.mkdir(parents=True)
    for name in k8s.HAND_WRITTEN_FILES:
        (component / name).write_text((COMPONENT / name).read_text())
    monkeypatch.chdir(tmp_path)
    assert main(["manifests"]) == 0
    cap = capsys.readouterr()
    assert cap.out.splitlines() == [f"wrote {(component / name).resolve()}"
                                    for name in k8s.render_manifests()]
    assert "holds the 2 generated files only" not in cap.err
    for name, text in k8s.render_manifests().items():
        assert (component / name).read_text() == text

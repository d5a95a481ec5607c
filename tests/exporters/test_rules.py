"""Prometheus alert rules: drift against the spec, promtool check/test, catalogue names, CLI."""

from __future__ import annotations

import copy
import dataclasses
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

import monitor.alerts
from exporters.catalogue import BY_NAME
from exporters.rules import DEFAULT_RUNBOOK_BASE, STATIC_RULES, render_rules, render_yaml
from monitor.alerts import DEFAULT_RULES, AlertRule, Condition
from monitor.cli import main

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/rules.yml"
UNIT_TESTS = sorted((ROOT / "deploy/prometheus/tests").glob("*.yml"))
SHIPPED_BASE = "docs/runbooks.md"
"""REPWATCH_RUNBOOK_BASE unset: the in-process default, which rendered rules never use (relative)."""


@pytest.fixture(autouse=True)
def _shipped_runbook_base(monkeypatch: pytest.MonkeyPatch) -> None:
    """Render as shipped, whatever REPWATCH_RUNBOOK_BASE this shell exports."""
    monkeypatch.setattr(monitor.alerts, "RUNBOOK_BASE", SHIPPED_BASE)


def _all_rules(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in doc["groups"] for r in g["rules"]]


def _promtool_test(promtool: str, rules_text: str,
                   tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run the shipped unit tests against ``rules_text`` (laid out like deploy/prometheus/)."""
    (tmp_path / "rules.yml").write_text(rules_text)
    tests = tmp_path / "tests"
    tests.mkdir(exist_ok=True)
    for f in UNIT_TESTS:
        shutil.copy(f, tests / f.name)
    return subprocess.run([promtool, "test", "rules", *sorted(str(p) for p in tests.glob("*.yml"))],
                          capture_output=True, text=True, timeout=60, check=False)


# ---------------------------------------------------------------- drift, promtool


def test_rules_file_matches_the_spec() -> None:
    assert RULES.read_text() == render_yaml(), (
        "deploy/prometheus/rules.yml differs from the alert spec; regenerate it with "
        "`repwatch rules --out deploy/prometheus/rules.yml`")


def test_rendered_yaml_parses_back_to_the_rendered_data() -> None:
    assert yaml.safe_load(render_yaml()) == render_rules()


@pytest.mark.e2e
def test_promtool_check_rules(promtool: str) -> None:
    proc = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n = len(DEFAULT_RULES) + len(STATIC_RULES)
    assert f"SUCCESS: {n} rules found" in proc.stdout, proc.stdout


@pytest.mark.e2e
def test_promtool_unit_tests_pass(promtool: str) -> None:
    assert UNIT_TESTS, "no promtool unit tests in deploy/prometheus/tests/"
    proc = subprocess.run([promtool, "test", "rules", *map(str, UNIT_TESTS)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("SUCCESS") == len(UNIT_TESTS), proc.stdout


def _drop_keep_firing(doc: dict[str, Any]) -> None:
    for r in _all_rules(doc):
        r.pop("keep_firing_for", None)


def _drop_gates(doc: dict[str, Any]) -> None:
    for r in _all_rules(doc):
        r["expr"] = re.sub(r"\nand on\([^)]*\) \w+ >= \d+$", "", r["expr"])


def _drop_variant_aggregation(doc: dict[str, Any]) -> None:
    for r in _all_rules(doc):
        r["expr"] = r["expr"].replace("max without (tau) (", "(")


def _zero_for(doc: dict[str, Any]) -> None:
    for r in _all_rules(doc):
        r.pop("for", None)


def _inclusive_thresholds(doc: dict[str, Any]) -> None:
    for r in _all_rules(doc):
        r["expr"] = r["expr"].replace(" > ", " >= ").replace(" < ", " <= ")


def _value_unformatted(doc: dict[str, Any]) -> None:
    for r in _all_rules(doc):
        ann = r["annotations"]
        ann["description"] = ann["description"].replace('{{ $value | printf "%.4g" }}',
                                                        "{{ $value }}")


def _drop_also(doc: dict[str, Any]) -> None:
    """Drop every ``also`` part of a compound condition (`` and [on(...)] metric op x``; the
    window gate starts its own line and compares with ``>=``, so it stays)."""
    for r in _all_rules(doc):
        r["expr"] = re.sub(r" and (?:on\([^)]*\) )?repwatch_\w+(?:\{[^}]*\})? [<>] [\d.]+", "",
                           r["expr"])


def _stale_limit(doc: dict[str, Any]) -> None:
    for r in _all_rules(doc):
        r["expr"] = r["expr"].replace("> 600", "> 900")


@pytest.mark.parametrize("mutate", [_drop_keep_firing, _drop_gates, _drop_variant_aggregation,
                                    _zero_for, _inclusive_thresholds, _value_unformatted,
                                    _drop_also, _stale_limit], ids=lambda f: f.__name__)
@pytest.mark.e2e
def test_unit_tests_catch_a_broken_rule_file(promtool: str, tmp_path: Path,
                                             mutate: Callable[[dict[str, Any]], None]) -> None:
    doc = copy.deepcopy(render_rules())
    mutate(doc)
    text = yaml.safe_dump(doc, sort_keys=False)
    assert text != yaml.safe_dump(render_rules(), sort_keys=False), "mutation changed nothing"
    proc = _promtool_test(promtool, text, tmp_path)
    assert proc.returncode != 0, f"the promtool unit tests missed {mutate.__name__}:\n{proc.stdout}"


@pytest.mark.e2e
def test_unit_tests_pass_on_a_relaid_copy(promtool: str, tmp_path: Path) -> None:
    """The mutation harness itself works: the unmutated rules pass there."""
    proc = _promtool_test(promtool, render_yaml(), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_firing_and_quiet_cases() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for f in UNIT_TESTS:
        doc = yaml.safe_load(f.read_text())
        assert doc["rule_files"] == ["../rules.yml"], f
        for group in doc["tests"]:
            for case in group.get("alert_rule_test", []):
                (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {r["alert"] for r in _all_rules(render_rules())}
    assert names - fires == set(), f"alerts never tested firing: {sorted(names - fires)}"
    assert names - quiet == set(), f"alerts never tested quiet: {sorted(names - quiet)}"
    assert fires <= names and quiet <= names, "unit tests name alerts that do not exist"


# ---------------------------------------------------------------- expressions vs catalogue

_METRIC = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")
_PROMQL_WORDS = {"and", "or", "unless", "on", "ignoring", "by", "without", "max", "min", "time",
                 "bool", "group_left", "group_right"}


def _selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric, {label: value}) of every series selector in ``expr``."""
    expr = re.sub(r"\b(on|ignoring|by|without)\s*\([^)]*\)", "", expr)   # label lists
    out = []
    for name, matchers in _METRIC.findall(expr):
        if name in _PROMQL_WORDS or re.fullmatch(r"[\d.e]+", name):
            continue
        labels = dict(re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', matchers or ""))
        out.append((name, labels))
    return out


def test_every_metric_in_the_rules_is_in_the_catalogue() -> None:
    seen = set()
    for rule in _all_rules(render_rules()):
        for name, labels in _selectors(rule["expr"]):
            if name == "up":                       # Prometheus' own scrape health series
                continue
            seen.add(name)
            assert name in BY_NAME, f"{rule['alert']}: {name} is not in the catalogue"
            unknown = set(labels) - set(BY_NAME[name].labels)
            assert not unknown, f"{rule['alert']}: {name} has no labels {unknown}"
        for lists in re.findall(r"\b(?:on|without)\s*\(([^)]*)\)", rule["expr"]):
            for lab in (s.strip() for s in lists.split(",")):
                used = [n for n, _ in _selectors(rule["expr"]) if n in BY_NAME]
                assert any(lab in BY_NAME[n].labels for n in used), (rule["alert"], lab)
    # the parser sees what it should: one metric per spec signal plus the gates
    assert {"repwatch_dormant_units_ratio_rise", "repwatch_activation_effective_rank_peak_ratio",
            "repwatch_embedding_dim", "repwatch_embedding_variance_ratio",
            "repwatch_activation_window_samples", "repwatch_window_samples",
            "repwatch_earlybird_ticket_found", "repwatch_last_publish_timestamp_seconds"} <= seen


def test_selector_parser_finds_unknown_names() -> None:
    got = _selectors('(max without (tau) (repwatch_nope{tau="0.1"} > 1))\n'
                     "and on(run, stream) repwatch_window_samples >= 256")
    assert got == [("repwatch_nope", {"tau": "0.1"}), ("repwatch_window_samples", {})]


def test_variant_keys_become_matchers_and_layer_signals_map_to_activation_metrics() -> None:
    by = {r["alert"]: r for r in _all_rules(render_rules())}
    expr = by["RepwatchPlasticityLoss"]["expr"]
    assert 'repwatch_dormant_units_ratio_rise{tau="0.1"} > 0.25' in expr
    assert "repwatch_activation_effective_rank_peak_ratio < 0.6" in expr
    # the parts carry different variant labels: matched on the layer, tau aggregated away
    assert ("max without (tau) (repwatch_dormant_units_ratio_rise{tau=\"0.1\"} > 0.25 and "
            "on(run, layer) repwatch_activation_effective_rank_peak_ratio < 0.6)") in expr
    assert expr.endswith("and on(run, layer) repwatch_activation_window_samples >= 64")
    assert "window_samples" not in by["RepwatchEarlyBirdTicket"]["expr"]        # run scope
    assert "window_samples" not in by["RepwatchGeneratorModeCollapse"]["expr"]  # N = 0


def test_rendered_fields_follow_the_spec() -> None:
    by = {r["alert"]: r for r in _all_rules(render_rules())}
    for spec in DEFAULT_RULES:
        r = by[spec.name]
        assert r["labels"] == {"severity": spec.severity}
        assert r.get("for", "0m") == spec.prometheus_for
        assert r["annotations"]["summary"] == spec.summary
        desc = r["annotations"]["description"]
        assert not re.search(r"(?<!\{)\{(stream|layer|run|signal|value|expr)[:}]", desc), desc
        assert desc.count("{{") == desc.count("}}")
    assert list(by)[-2:] == ["RepwatchStale", "RepwatchDown"]


def test_runbook_urls_point_to_runbook_sections() -> None:
    text = (ROOT / "docs/runbooks.md").read_text()
    headings = {m.lower() for m in re.findall(r"^## (\w+)$", text, flags=re.MULTILINE)}
    for r in _all_rules(render_rules()):
        base, _, anchor = r["annotations"]["runbook_url"].partition("#")
        assert base == DEFAULT_RUNBOOK_BASE     # absolute: the relative in-process base is not
        assert anchor in headings, f"{r['alert']}: no section #{anchor} in docs/runbooks.md"


def test_runbook_base_override() -> None:
    doc = render_rules(runbook_base="https://example.org/runbooks")
    urls = [r["annotations"]["runbook_url"] for r in _all_rules(doc)]
    assert urls[0] == "https://example.org/runbooks#repwatchrepresentationcollapse"
    assert urls[-1] == "https://example.org/runbooks#repwatchdown"


# ---------------------------------------------------------------- bad input


def test_unknown_description_field_is_rejected() -> None:
    rule = dataclasses.replace(DEFAULT_RULES[0], description="{stream} {bogus}")
    with pytest.raises(ValueError, match=r"unknown fields \['bogus'\]"):
        render_rules((rule,))


def test_unknown_variant_label_is_rejected() -> None:
    rule = AlertRule(name="RepwatchX", severity="warning", summary="s", description="{stream}",
                     conditions=(Condition("effective_rank{tau=0.1}", "<", 1, clear=2),))
    with pytest.raises(ValueError, match=r"repwatch_effective_rank has variant labels \[\], "
                                         r"the key gives \['tau'\]"):
        render_rules((rule,))


def test_missing_variant_label_is_rejected() -> None:
    rule = AlertRule(name="RepwatchX", severity="warning", summary="s", description="{layer}",
                     conditions=(Condition("dormant_units_ratio", ">", 0.5, clear=0.4),),
                     scope="layer")
    with pytest.raises(ValueError, match=r"has variant labels \['tau'\], the key gives \[\]"):
        render_rules((rule,))


def test_unknown_signal_is_rejected() -> None:
    rule = AlertRule(name="RepwatchX", severity="warning", summary="s", description="{stream}",
                     conditions=(Condition("no_such_signal", "<", 1, clear=2),))
    with pytest.raises(KeyError, match="no_such_signal"):
        render_rules((rule,))


def test_duplicate_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        render_rules((DEFAULT_RULES[0], DEFAULT_RULES[0]))


# ---------------------------------------------------------------- CLI, imports


def test_cli_writes_the_rendered_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rules.yml"
    assert main(["rules", "--out", str(out)]) == 0
    assert out.read_text() == RULES.read_text()
    capsys.readouterr()
    assert main(["rules"]) == 0
    assert capsys.readouterr().out == RULES.read_text()


@pytest.mark.e2e
def test_rules_import_without_torch() -> None:
    code = ("import sys, exporters.rules; exporters.rules.render_yaml(); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- issue 19: runbook links


def test_runbook_urls_are_absolute_and_served_by_repwatch() -> None:
    """Alertmanager and Grafana show runbook_url as a link: it must be an absolute URL. The
    default points to the runbooks a repwatch server serves (/runbooks, with each alert's
    anchor), at the loopback address of `make demo` and the compose stack's sidecar."""
    from urllib.parse import urlsplit

    from fastapi.testclient import TestClient

    from exporters.rules import DEFAULT_RUNBOOK_BASE
    from monitor.server.app import create_app

    shipped = yaml.safe_load(RULES.read_text())
    client = TestClient(create_app(lambda: None, lambda: [], DEFAULT_RULES))
    pages: dict[str, str] = {}
    for doc in (render_rules(), shipped):
        for r in _all_rules(doc):
            url = r["annotations"]["runbook_url"]
            parts = urlsplit(url)
            assert parts.scheme in ("http", "https") and parts.netloc, (r["alert"], url)
            assert url.startswith(DEFAULT_RUNBOOK_BASE + "#"), url
            if parts.path not in pages:
                resp = client.get(parts.path)
                assert resp.status_code == 200, url
                pages[parts.path] = resp.text
            assert f'id="{parts.fragment}"' in pages[parts.path], url
    assert urlsplit(DEFAULT_RUNBOOK_BASE).netloc == "127.0.0.1:9400"
    compose = yaml.safe_load((ROOT / "deploy/compose.yml").read_text())
    assert "127.0.0.1:9400:9400" in compose["services"]["sidecar"]["ports"]


def test_relative_runbook_base_is_refused(capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("docs/runbooks.md", "/runbooks", "file:///srv/runbooks.md",
                "https://x.example/rb#a"):
        with pytest.raises(ValueError, match="absolute http"):
            render_rules(runbook_base=bad)
        with pytest.raises(SystemExit):
            main(["rules", "--runbook-base", bad])
        assert "absolute http(s) URL" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            main(["manifests", "--out", "/nonexistent", "--runbook-base", bad])
        capsys.readouterr()
    # an absolute $REPWATCH_RUNBOOK_BASE is used; the relative in-process default is not
    monkeypatch.setattr(monitor.alerts, "RUNBOOK_BASE", "https://wiki.example/repwatch")
    urls = [r["annotations"]["runbook_url"] for r in _all_rules(render_rules())]
    assert all(u.startswith("https://wiki.example/repwatch#") for u in urls)
    assert main(["rules", "--runbook-base", "https://b.example/rb"]) == 0
    assert "runbook_url: https://b.example/rb#repwatchdown" in capsys.readouterr().out

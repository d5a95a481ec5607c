"""Grafana: dashboard drift, catalogue-only PromQL checked by a real Prometheus, layout, the
provisioning files, and `repwatch grafana push` against a stand-in of Grafana's HTTP API."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import yaml

from exporters.catalogue import BY_NAME, CATALOGUE
from exporters.catalogue import PREFIX as PREFIX_
from exporters.grafana import (DASHBOARD_UID, DATASOURCE_UID, DCGM_FB_USED, DCGM_GPU_UTIL,
                               EXTERNAL_METRICS, FAMILIES, FOLDER_UID, OMITTED, PLAIN_RATIOS,
                               RISES, expressions, family_of, grafana_alert_rules, iter_panels,
                               render_dashboard, render_json)
from exporters.rules import SOURCE_OF_SCOPE, render_rules
from monitor.alerts import DEFAULT_RULES
from monitor.cli import main
from tests.grafana_standin import StandIn, grafana_standin
from tests.test_alerting_e2e import _Proc, _free_ports, _spawn, _wait

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "repwatch.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"

VARIABLES = {"$__rate_interval": "1m", "$run": ".*", "$stream": ".*", "$layer": ".*"}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return render_dashboard()


def _selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """(metric name, {label: (op, value)}) of every vector selector, from a real PromQL parser."""
    found: list[tuple[str, dict[str, tuple[str, str]]]] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            ms = {m.name: (str(m.op).rsplit(".", 1)[-1], m.value)
                  for m in node.matchers.matchers}
            found.append((node.name or "", ms))
        return True

    promql_parser.walk(promql_parser.parse(_substitute(expr)), visit)
    return found


def _substitute(expr: str) -> str:
    for var, value in VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable left in {expr!r}"
    return expr


def _catalogue_name(name: str) -> str | None:
    """The catalogue metric a series name belongs to (histogram series map to their metric)."""
    if name in BY_NAME:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in BY_NAME and BY_NAME[base].kind == "histogram":
            return base
    return None


# ----------------------------------------------------------------------------- drift, CLI


def test_dashboard_file_matches_the_catalogue_and_spec() -> None:
    assert DASHBOARD.read_text(encoding="utf-8") == render_json(), (
        "deploy/grafana/dashboards/repwatch.json is stale: run "
        "`repwatch dashboard --out deploy/grafana/dashboards/repwatch.json`")
    assert json.loads(DASHBOARD.read_text(encoding="utf-8")) == render_dashboard()


def test_cli_writes_the_dashboard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "repwatch.json"
    assert main(["dashboard", "--out", str(out)]) == 0
    assert out.read_text() == DASHBOARD.read_text()
    capsys.readouterr()
    assert main(["dashboard"]) == 0
    assert capsys.readouterr().out == DASHBOARD.read_text()


@pytest.mark.e2e
def test_dashboard_command_works_without_torch(tmp_path: Path) -> None:
    out = tmp_path / "d.json"
    code = ("import sys; sys.modules['torch'] = None  # `import torch` now raises ImportError\n"
            "from monitor.cli import main\n"
            f"assert main(['dashboard', '--out', {str(out)!r}]) == 0\n"
            "import exporters.grafana as g; g.grafana_alert_rules()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == DASHBOARD.read_text()


# ----------------------------------------------------------------------------- model


def test_classic_model_identity_and_variables(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "repwatch" and dashboard["title"] == "repwatch"
    assert 36 <= dashboard["schemaVersion"] <= 41          # classic JSON model, not the v2 schema
    assert "elements" not in dashboard and "layout" not in dashboard
    assert dashboard.get("id") is None
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "run", "stream", "layer"]
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    for name in ("run", "stream", "layer"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"]["uid"] == "${datasource}"
        assert v["multi"] is True and v["includeAll"] is True
        assert v["allValue"] == ".*", "All must be .*, not an alternation of every run"
        assert v["refresh"] == 2, "refresh on time-range change"
        assert v["regex"] == "" and v["sort"] in (1, 2, 3, 4, 5, 6, 7, 8)
        assert v["definition"] == v["query"]["query"]
        assert v["definition"].startswith("label_values(") and v["definition"].endswith(
            f", {name})")
    # stream and layer are narrowed by the selected runs
    for name in ("stream", "layer"):
        (metric, ms), = _selectors(expressions_by_where(dashboard)[f"variable {name}"])
        assert ms.get("run") == ("Re", ".*"), ms
        assert name in BY_NAME[metric].labels


def expressions_by_where(dashboard: dict[str, Any]) -> dict[str, str]:
    return dict(expressions(dashboard))


def test_alert_annotation_marks_repwatch_alerts_of_the_selected_runs(
        dashboard: dict[str, Any]) -> None:
    anns = [a for a in dashboard["annotations"]["list"] if "expr" in a]
    assert len(anns) == 1 and anns[0]["enable"] is True
    assert anns[0]["datasource"]["uid"] == "${datasource}"
    ((name, ms),) = _selectors(anns[0]["expr"])
    assert name == "ALERTS"
    assert ms["alertname"] == ("Re", "Repwatch.*") and ms["run"] == ("Re", ".*")


def test_every_expression_uses_only_catalogue_metrics_and_their_labels(
        dashboard: dict[str, Any]) -> None:
    exprs = expressions(dashboard)
    assert len(exprs) > len(CATALOGUE)
    external_seen = set()
    for where, expr in exprs:
        for name, ms in _selectors(expr):
            assert name, f"{where}: selector without a metric name: {expr}"
            base = _catalogue_name(name)
            if base is None:
                assert name in EXTERNAL_METRICS, f"{where}: {name} is not in the catalogue"
                external_seen.add(name)
                continue
            unknown = set(ms) - set(BY_NAME[base].labels) - ({"le"} if name != base else set())
            assert not unknown, f"{where}: {name} has no labels {unknown}"
    assert {DCGM_GPU_UTIL, DCGM_FB_USED, "ALERTS"} <= external_seen


def test_the_checker_catches_a_foreign_metric(dashboard: dict[str, Any]) -> None:
    broken = copy.deepcopy(dashboard)
    next(p for p in iter_panels(broken) if p["type"] == "timeseries")["targets"][0]["expr"] = \
        'node_cpu_seconds_total{run=~"$run"}'
    with pytest.raises(AssertionError, match="node_cpu_seconds_total"):
        test_every_expression_uses_only_catalogue_metrics_and_their_labels(broken)


def test_selectors_filter_by_the_variables_of_their_scope(dashboard: dict[str, Any]) -> None:
    for where, expr in expressions(dashboard):
        if where.startswith(("variable", "annotation")):
            continue
        for name, ms in _selectors(expr):
            base = _catalogue_name(name)
            if base is None:
                continue
            spec = BY_NAME[base]
            want = {lab for lab in ("run", "layer") if lab in spec.labels}
            if "stream" in spec.labels and spec.source != "alerts":
                want.add("stream")      # alerts_firing's stream may hold a layer: run only
            have = {lab for lab, (op, value) in ms.items()
                    if op == "Re" and value == ".*" and lab in ("run", "stream", "layer")}
            assert have == want, f"{where}: {name} filters {sorted(have)}, want {sorted(want)}"


def test_every_catalogue_metric_has_a_panel(dashboard: dict[str, Any]) -> None:
    shown: set[str | None] = set()
    for where, expr in expressions(dashboard):
        if where.startswith("panel"):
            shown |= {_catalogue_name(n) for n, _ in _selectors(expr)}
    for spec in CATALOGUE:
        if spec.name in OMITTED:
            assert OMITTED[spec.name].strip(), f"{spec.name}: omitted without a reason"
            continue
        assert spec.name in shown, f"{spec.name} has no panel"


def test_panel_ids_unique_and_grid_without_overlap(dashboard: dict[str, Any]) -> None:
    panels = iter_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] > 0 and g["h"] > 0
        assert g["x"] + g["w"] <= 24, f"panel {p['id']} is wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {p['id']} overlap"
                cells[(x, y)] = p["id"]


def test_rows_per_family_and_panels_in_their_row(dashboard: dict[str, Any]) -> None:
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    titles = [r["title"] for r in rows]
    for word in ("Spectrum", "Collapse", "Plasticity", "Q-Score", "Neural collapse", "GAN",
                 "repwatch health"):
        assert sum(word in t for t in titles) == 1, (word, titles)
    # which row each panel sits in: collapsed rows hold theirs, open rows precede theirs
    row_of: dict[int, str] = {}
    current = ""
    for p in dashboard["panels"]:
        if p["type"] == "row":
            current = p["title"]
            for child in p.get("panels", []):
                row_of[child["id"]] = current
        else:
            row_of[p["id"]] = current
    fam_title = {f.key: f.title for f in FAMILIES}
    for p in iter_panels(dashboard):
        if p["type"] == "row":
            assert p["collapsed"] is bool(p["panels"]), "open rows hold no panels"
            continue
        for t in p["targets"]:
            for name, _ in _selectors(t["expr"]):
                base = _catalogue_name(name)
                want = fam_title[family_of(BY_NAME[base])] if base else fam_title["health"]
                assert row_of[p["id"]] == want, (p["title"], row_of[p["id"]], want)
    health = [p for p in iter_panels(dashboard) if row_of.get(p["id"]) == fam_title["health"]]
    health_exprs = " ".join(t["expr"] for p in health for t in p["targets"])
    for name in ("repwatch_samples_total", "repwatch_dropped_samples_total", "repwatch_errors_total",
                 "repwatch_last_publish_timestamp_seconds", "repwatch_received_samples_total",
                 "repwatch_sidecar_queued_samples", DCGM_GPU_UTIL, DCGM_FB_USED):
        assert name in health_exprs, name
    assert any("time() - repwatch_last_publish_timestamp_seconds" in t["expr"]
               for p in health for t in p["targets"]), "publish age"
    assert any("sum by (run, reason)" in t["expr"] for p in health for t in p["targets"]), \
        "dropped by reason"


def _panels_of(dashboard: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    return [p for p in iter_panels(dashboard) if p["type"] == "timeseries"
            and any(_catalogue_name(n) == metric for t in p["targets"]
                    for n, _ in _selectors(t["expr"]))]


def _own_panels(dashboard: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    """The panels that show ``metric`` (their first query's first series), not those that only
    join with it (the GPU panels read the runs' publish timestamps to find their pods)."""
    return [p for p in _panels_of(dashboard, metric)
            if _catalogue_name(_selectors(p["targets"][0]["expr"])[0][0]) == metric]


def test_units_and_descriptions_come_from_the_catalogue(dashboard: dict[str, Any]) -> None:
    for spec in CATALOGUE:
        for p in _own_panels(dashboard, spec.name):
            assert spec.help in p["description"], spec.name
            unit = p["fieldConfig"]["defaults"]["unit"]
            if spec.kind == "counter":
                assert unit == "cps" and "rate(" in p["targets"][0]["expr"], spec.name
            elif spec.unit == "ratio" or spec.name in RISES:
                # fractions of a whole (and their rises) in percent; a value over a reference
                # (1 = as much as it) as a plain number
                assert unit == ("none" if spec.name in PLAIN_RATIOS else "percentunit"), spec.name
            elif spec.unit == "seconds":
                assert unit == "s", spec.name
            else:
                assert unit not in ("percentunit", "s"), spec.name
    for metric, unit in ((DCGM_GPU_UTIL, "percent"), (DCGM_FB_USED, "mbytes")):
        (panel,) = [p for p in iter_panels(dashboard) if p["type"] == "timeseries"
                    and any(t["expr"].startswith(metric + " ") for t in p["targets"])]
        assert panel["fieldConfig"]["defaults"]["unit"] == unit


def _color_at(steps: list[dict[str, Any]], value: float) -> str:
    color = steps[0]["color"]
    for s in steps[1:]:
        if value >= s["value"]:
            color = s["color"]
    return color


def test_threshold_lines_follow_the_alert_spec(dashboard: dict[str, Any]) -> None:
    alerted: set[str] = set()
    for rule in DEFAULT_RULES:
        for cond in rule.conditions:
            metric = next(m.name for m in CATALOGUE
                          if m.signal == cond.signal.signal and m.source == SOURCE_OF_SCOPE[rule.scope])
            alerted.add(metric)
            (panel,) = _panels_of(dashboard, metric)
            d = panel["fieldConfig"]["defaults"]
            assert d["custom"]["thresholdsStyle"]["mode"] in ("line", "line+area", "dashed")
            steps = d["thresholds"]["steps"]
            assert steps[0]["value"] is None
            assert cond.threshold in [s["value"] for s in steps[1:]], (metric, steps)
            eps = 1e-6 * max(1.0, abs(cond.threshold))
            firing = cond.threshold - eps if cond.op == "<" else cond.threshold + eps
            assert _color_at(steps, firing) != "green", (metric, cond)
            assert rule.name in panel["description"]
            healthy = cond.threshold + 1e3 if cond.op == "<" else cond.threshold - 1e3
            assert _color_at(steps, healthy) == "green", (metric, steps)
    assert alerted, "the spec has no conditions"
    for p in iter_panels(dashboard):
        if p["type"] != "timeseries":
            continue
        names = {_catalogue_name(n) for t in p["targets"] for n, _ in _selectors(t["expr"])}
        if not names & alerted:
            assert p["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "off"


# ----------------------------------------------------------------------------- real Prometheus


@pytest.fixture(scope="module")
def prometheus_url(prometheus: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Prometheus (no targets) on a free loopback port for every expression; torn down."""
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text("global:\n  scrape_interval: 15s\n")
    (port,) = _free_ports(1)
    url = f"http://127.0.0.1:{port}"
    procs: list[_Proc] = []
    with ExitStack() as stack:
        procs.append(_spawn(stack, "prometheus", [
            prometheus, f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn"], work / "prometheus.log", cwd=work))

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(ready, 60, "Prometheus ready", lambda: "\n".join(p.report() for p in procs))
        yield url


def _query(url: str, expr: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": _substitute(expr)}, timeout=10)
    return dict(r.json())


@pytest.mark.slow
def test_every_expression_is_valid_promql(prometheus_url: str,
                                          dashboard: dict[str, Any]) -> None:
    exprs = expressions(dashboard)
    failures = []
    for where, expr in exprs:
        body = _query(prometheus_url, expr)
        if body.get("status") != "success":
            failures.append(f"{where}: {expr}\n  -> {body.get('error')}")
    assert not failures, "\n".join(failures)
    # the check can fail: Prometheus rejects a broken expression
    bad = _query(prometheus_url, 'sum by (run) (rate(repwatch_samples_total{run=~"$run"}[')
    assert bad.get("status") == "error"


# ----------------------------------------------------------------------------- provisioning


def test_provisioning_files_have_the_fields_grafana_requires() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "repwatch.yml").read_text())
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    for key in ("name", "type", "access", "url", "uid"):
        assert isinstance(source.get(key), str) and source[key], key
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert source["uid"] == DATASOURCE_UID == "repwatch-prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert isinstance(source.get("isDefault"), bool)

    dash = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "repwatch.yml").read_text())
    assert dash["apiVersion"] == 1
    (provider,) = dash["providers"]
    assert isinstance(provider["name"], str) and provider["name"]
    assert provider["type"] == "file" and provider["folder"] == "repwatch"
    assert provider["options"]["path"].startswith("/")
    assert provider.get("folderUid", FOLDER_UID) == FOLDER_UID
    for key in ("disableDeletion", "allowUiUpdates"):
        assert isinstance(provider.get(key, False), bool)
    assert isinstance(provider.get("updateIntervalSeconds", 10), int)
    assert DASHBOARD.is_file()


# ----------------------------------------------------------------------------- alert rules


def test_grafana_alert_rules_reuse_the_prometheus_rules() -> None:
    prom = {r["alert"]: r for g in render_rules()["groups"] for r in g["rules"]}
    rules = grafana_alert_rules()
    assert [r["title"] for r in rules] == list(prom)
    uids = [r["uid"] for r in rules]
    assert len(set(uids)) == len(uids) and all(len(u) <= 40 for u in uids)
    for r in rules:
        p = prom[r["title"]]
        refs = [q["refId"] for q in r["data"]]
        assert r["condition"] == refs[-1]
        (query,) = [q for q in r["data"] if q["datasourceUid"] == DATASOURCE_UID]
        assert query["model"]["expr"] == p["expr"]
        assert r["for"] == p.get("for", "0s")
        assert r["labels"] == p["labels"] and r["annotations"] == p["annotations"]


# ----------------------------------------------------------------------------- push


@pytest.fixture
def standin() -> Iterator[StandIn]:
    with grafana_standin() as s:
        yield s


def _token_file(tmp_path: Path, token: str) -> str:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    return str(path)


def _push(standin: StandIn, tmp_path: Path, *extra: str, token: str | None = None,
          url: str | None = None) -> int:
    return main(["grafana", "push", "--url", url or standin.url, "--token-file",
                 _token_file(tmp_path, token or standin.admin_token), *extra])


def test_push_creates_folder_and_dashboard_then_updates(
        standin: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _push(standin, tmp_path, "--folder", "Training health") == 0
    st = standin.state
    assert list(st.folders) == [FOLDER_UID] and st.folders[FOLDER_UID]["title"] == "Training health"
    saved = st.dashboards[DASHBOARD_UID]
    assert saved["folderUid"] == FOLDER_UID and saved["dashboard"]["version"] == 1
    sent = {k: v for k, v in saved["dashboard"].items() if k not in ("id", "version")}
    assert sent == {k: v for k, v in render_dashboard().items() if k != "version"}
    assert "version 1" in capsys.readouterr().out

    n = len(st.requests)
    assert _push(standin, tmp_path, "--folder", "Training health") == 0
    assert list(st.folders) == [FOLDER_UID], "a second push must not add a folder"
    assert st.dashboards[DASHBOARD_UID]["dashboard"]["version"] == 2
    assert len(st.dashboards) == 1
    second = [(m, p) for m, p, _ in st.requests[n:]]
    assert ("POST", "/api/folders") not in second and ("POST", "/api/dashboards/db") in second
    assert "version 2" in capsys.readouterr().out


def test_push_with_alerts_creates_rules_equal_to_the_rules_file(
        standin: StandIn, tmp_path: Path) -> None:
    shipped = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"]
               for r in g["rules"]}
    assert _push(standin, tmp_path, "--alerts") == 0
    rules = standin.state.rules
    assert sorted(r["title"] for r in rules.values()) == sorted(shipped)
    for r in rules.values():
        s = shipped[r["title"]]
        (expr,) = [q["model"]["expr"] for q in r["data"] if q["datasourceUid"] != "__expr__"]
        assert expr == s["expr"]
        assert (r["labels"], r["annotations"]) == (s["labels"], s["annotations"])
        assert r["for"] == s.get("for", "0s")
        assert r["ruleGroup"] == "repwatch" and r["folderUID"] == FOLDER_UID
        assert r["provenance"] == "", "X-Disable-Provenance keeps the rules editable"

    # changed in Grafana, then pushed again: updated in place (PUT), nothing duplicated
    uid = next(iter(rules))
    rules[uid]["for"] = "1h"
    n = len(standin.state.requests)
    assert _push(standin, tmp_path, "--alerts") == 0
    assert len(standin.state.rules) == len(shipped)
    assert rules[uid]["for"] == shipped[rules[uid]["title"]].get("for", "0s")
    methods = [m for m, p, _ in standin.state.requests[n:] if "alert-rules" in p]
    assert "POST" not in methods and methods.count("PUT") == len(shipped)


@pytest.mark.parametrize("which", ["wrong", "viewer"])
def test_rejected_token_exits_2_with_one_line(standin: StandIn, tmp_path: Path, which: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    token = "glsa_not_a_token" if which == "wrong" else standin.viewer_token
    assert _push(standin, tmp_path, "--alerts", token=token) == 2
    err = capsys.readouterr().err.strip()
    assert "token rejected" in err and "\n" not in err
    assert ("401" if which == "wrong" else "403") in err
    assert token not in err
    assert not standin.state.dashboards and not standin.state.rules


def test_unreachable_grafana_exits_2(tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    (port,) = _free_ports(1)                  # nothing listens there
    t0 = time.monotonic()
    code = main(["grafana", "push", "--url", f"http://127.0.0.1:{port}", "--token-file",
                 _token_file(tmp_path, "glsa_x")])
    assert code == 2 and time.monotonic() - t0 < 30
    err = capsys.readouterr().err.strip()
    assert "unreachable" in err and "\n" not in err


def test_version_mismatch_exits_2(standin: StandIn, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    standin.state.faults[("POST", "/api/dashboards/db")] = (
        412, {"status": "version-mismatch", "message": "The dashboard has been changed by "
                                                        "someone else"})
    assert _push(standin, tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert "version mismatch" in err and "412" in err and "\n" not in err


def test_token_file_problems_exit_2(standin: StandIn, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["grafana", "push", "--url", standin.url, "--token-file",
                 str(tmp_path / "missing")]) == 2
    assert "token file" in capsys.readouterr().err
    assert _push(standin, tmp_path, token=" ") == 2
    assert "token file" in capsys.readouterr().err
    with pytest.raises(SystemExit):            # no way to pass a token on the command line
        main(["grafana", "push", "--url", standin.url, "--token", "x"])
    assert not standin.state.requests[1:], "nothing may be sent without a token"


# ----------------------------------------------------------------------------- the stand-in


def test_standin_rejects_requests_grafana_would_reject(standin: StandIn) -> None:
    h = {"Authorization": f"Bearer {standin.admin_token}"}
    c = httpx.Client(base_url=standin.url, headers=h, timeout=10)
    assert httpx.post(f"{standin.url}/api/folders", json={"title": "x"}).status_code == 401
    assert c.post("/api/folders", content=b'{"title": "x"}',
                  headers={"Content-Type": "text/plain"}).status_code == 415
    assert c.post("/api/folders", json={"uid": "a" * 41, "title": "x"}).status_code == 400
    assert c.post("/api/folders", json={"title": "x", "uid": "x"}).status_code == 200
    assert c.post("/api/folders", json={"title": "y", "uid": "x"}).status_code == 409
    assert c.post("/api/dashboards/db", json={"dashboard": {"uid": "d"}}).status_code == 400
    assert c.post("/api/dashboards/db", json={"dashboard": {"title": "t"},
                                              "folderUid": "nope"}).status_code == 400
    r = c.post("/api/dashboards/db", json={"dashboard": {"title": "t", "uid": "d"}})
    assert r.status_code == 200 and r.json()["version"] == 1
    stale = c.post("/api/dashboards/db", json={"dashboard": {"title": "t", "uid": "d",
                                                             "version": 0}})
    assert stale.status_code == 412 and stale.json()["status"] == "version-mismatch"
    rule = copy.deepcopy(grafana_alert_rules(folder_uid="x")[0])
    for mutate in (lambda r: r.pop("folderUID") and r.update(folderUid="x"),   # misspelt
                   lambda r: r.update(condition="nope"),
                   lambda r: r.pop("noDataState"),
                   lambda r: r["data"][0].update(datasourceUid="unknown-ds"),
                   lambda r: r["data"][1]["model"].update(expression="$nope"),
                   lambda r: r.update(**{"for": "two minutes"})):
        bad = copy.deepcopy(rule)
        mutate(bad)
        assert c.post("/api/v1/provisioning/alert-rules", json=bad).status_code == 400, bad
    assert c.post("/api/v1/provisioning/alert-rules", json=rule).status_code == 201
    assert c.post("/api/v1/provisioning/alert-rules", json=rule).status_code == 409
    assert c.get(f"/api/v1/provisioning/alert-rules/{rule['uid']}").json()["provenance"] == "api"
    assert c.put("/api/v1/provisioning/alert-rules/nope", json=rule).status_code == 404
    assert c.get("/api/folders/none").status_code == 404
    c.close()



# ----------------------------------------------------------------------------- issue 19


def _panel(dashboard: dict[str, Any], metric: str) -> dict[str, Any]:
    (panel,) = _own_panels(dashboard, metric)
    return panel


def test_ratio_units_say_what_the_value_is(dashboard: dict[str, Any]) -> None:
    """The std ratio is ≈ 1 when healthy: a plain number, not "100 %"; the dormant fraction
    and its rise share one unit; 0-1 signals keep a 0-1 (soft) axis."""
    unit = {m: _panel(dashboard, PREFIX_ + m)["fieldConfig"]["defaults"]
            for m in ("embedding_std_ratio", "dormant_units_ratio", "dormant_units_ratio_rise",
                      "embedding_variance_ratio", "effective_rank_peak_ratio", "srank")}
    assert unit["embedding_std_ratio"]["unit"] == "none"
    assert unit["embedding_variance_ratio"]["unit"] == "none"
    assert unit["dormant_units_ratio"]["unit"] == unit["dormant_units_ratio_rise"]["unit"] == \
        "percentunit"
    assert unit["effective_rank_peak_ratio"]["unit"] == "percentunit"
    for m in ("embedding_std_ratio", "dormant_units_ratio", "dormant_units_ratio_rise",
              "effective_rank_peak_ratio"):
        custom = unit[m]["custom"]
        assert (custom["axisSoftMin"], custom["axisSoftMax"]) == (0, 1), m
    assert "axisSoftMax" not in unit["srank"]["custom"]


def _dcgm_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in iter_panels(dashboard) if p["type"] == "timeseries"
            and any(DCGM_GPU_UTIL in t["expr"] or DCGM_FB_USED in t["expr"]
                    for t in p["targets"])]


def test_gpu_panels_say_how_they_are_scoped(dashboard: dict[str, Any]) -> None:
    panels = _dcgm_panels(dashboard)
    assert len(panels) == 2
    for p in panels:
        desc = p["description"]
        assert "pod" in desc and "every GPU" in desc, desc
        (target,) = p["targets"]
        assert "on(namespace, pod)" in target["expr"] and '$run' in target["expr"]


@pytest.mark.e2e
def test_gpu_panels_show_the_runs_gpus_only(promtool: str, dashboard: dict[str, Any],
                                            tmp_path: Path) -> None:
    """promtool evaluates the panels' queries: in Kubernetes (namespace/pod labels on both
    sides) only the GPUs of the selected run's pod; without those labels every GPU."""
    exprs = [p["targets"][0]["expr"] for p in _dcgm_panels(dashboard)]
    k8s_series = [
        {"series": f'{DCGM_GPU_UTIL}{{gpu="0",Hostname="n1",namespace="ml",pod="exp1-0"}}',
         "values": "50x5"},
        {"series": f'{DCGM_GPU_UTIL}{{gpu="1",Hostname="n1",namespace="ml",pod="other-0"}}',
         "values": "90x5"},
        {"series": f'{DCGM_FB_USED}{{gpu="0",Hostname="n1",namespace="ml",pod="exp1-0"}}',
         "values": "1000x5"},
        {"series": f'{DCGM_FB_USED}{{gpu="1",Hostname="n1",namespace="ml",pod="other-0"}}',
         "values": "2000x5"},
        {"series": 'repwatch_last_publish_timestamp_seconds{run="exp1",namespace="ml",'
                   'pod="exp1-0",instance="10.0.0.5:9400",job="ml/repwatch"}', "values": "1x5"},
        {"series": 'repwatch_last_publish_timestamp_seconds{run="exp2",namespace="ml",'
                   'pod="exp2-0",instance="10.0.0.6:9400",job="ml/repwatch"}', "values": "1x5"},
    ]
    plain_series = [
        {"series": f'{DCGM_GPU_UTIL}{{gpu="0",Hostname="h"}}', "values": "50x5"},
        {"series": f'{DCGM_GPU_UTIL}{{gpu="1",Hostname="h"}}', "values": "90x5"},
        {"series": 'repwatch_last_publish_timestamp_seconds{run="exp1",instance="h:9400",'
                   'job="repwatch"}', "values": "1x5"},
    ]
    util, fb = (e.replace("$run", "exp1") for e in exprs)
    tests = [
        {"interval": "1m", "input_series": k8s_series, "promql_expr_test": [
            {"expr": util, "eval_time": "2m", "exp_samples": [
                {"labels": f'{DCGM_GPU_UTIL}{{gpu="0",Hostname="n1",namespace="ml",'
                           'pod="exp1-0"}', "value": 50}]},
            {"expr": fb, "eval_time": "2m", "exp_samples": [
                {"labels": f'{DCGM_FB_USED}{{gpu="0",Hostname="n1",namespace="ml",'
                           'pod="exp1-0"}', "value": 1000}]}]},
        {"interval": "1m", "input_series": plain_series, "promql_expr_test": [
            {"expr": util, "eval_time": "2m", "exp_samples": [
                {"labels": f'{DCGM_GPU_UTIL}{{gpu="0",Hostname="h"}}', "value": 50},
                {"labels": f'{DCGM_GPU_UTIL}{{gpu="1",Hostname="h"}}', "value": 90}]}]},
    ]
    (tmp_path / "empty.yml").write_text("groups: []\n")
    test_file = tmp_path / "dcgm_test.yml"
    test_file.write_text(yaml.safe_dump({"rule_files": ["empty.yml"], "evaluation_interval": "1m",
                                         "tests": tests}, sort_keys=False))
    proc = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True,
                          text=True, timeout=60, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""Grafana: the repwatch dashboard generated from the metric catalogue, and a push of it (plus,
optionally, Grafana-managed alert rules from the one alert spec) to a Grafana server.

``repwatch dashboard --out deploy/grafana/dashboards/repwatch.json`` writes
:func:`render_json`; a test fails when the shipped file drifts from it. ``repwatch grafana push``
calls :func:`push` (needs the ``grafana`` extra: grafana-client). Importable without torch and
without grafana-client.

The dashboard is Grafana's classic JSON model (``schemaVersion`` 39, not the v2 schema):

* variables ``datasource`` (any Prometheus data source), ``run``, ``stream``, ``layer``
  (``label_values`` over catalogue metrics, multi-value with an *All* of ``.*`` so that many runs
  never turn into a huge regex alternation, refreshed on time-range change, sorted);
* one row per signal family, one time-series panel per catalogue metric of the family (in
  catalogue order): counters as per-second rates, the histogram as quantiles, a Unix timestamp as
  an age; fractions of a whole (catalogue ``unit="ratio"``: shares of units, samples, the
  trace, ...) and their rises in ``percentunit``, ratios of two values where 1 is "as much as
  the reference" (:data:`PLAIN_RATIOS`: std ratio ≈ 1 healthy, variance and rank over their
  first window) as plain numbers (``none``); both on a 0–1 soft axis so that noise around
  0.82 is not stretched to full height; the description is the catalogue help (+ paper);
  threshold lines where an alert of ``monitor.alerts.DEFAULT_RULES`` reads the metric;
* the "repwatch health" row also holds scrape health (``up``) and two GPU panels from the NVIDIA
  DCGM exporter, which show "No data" where no DCGM exporter runs. GPUs carry no run label: the
  panels keep the GPUs whose ``namespace``/``pod`` labels (dcgm-exporter's Kubernetes pod
  mapping) match a pod of the selected runs (the labels a PodMonitor scrape puts on repwatch's
  series); outside Kubernetes neither side has them and every GPU is shown (said in the panel
  description);
* an annotation query marks ``ALERTS{alertname=~"Repwatch.*"}`` of the selected runs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

from exporters.catalogue import BY_NAME, CATALOGUE, PREFIX, MetricSpec, metric_for_signal
from monitor.alerts import DEFAULT_RULES, AlertRule

DASHBOARD_UID = "repwatch"
DASHBOARD_TITLE = "repwatch"
FOLDER_UID = "repwatch"
DATASOURCE_UID = "repwatch-prometheus"
"""UID of the Prometheus data source in ``deploy/grafana/provisioning/datasources/repwatch.yml``."""
SCHEMA_VERSION = 39
RULE_GROUP = "repwatch"
DS: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}

DCGM_GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"
DCGM_FB_USED = "DCGM_FI_DEV_FB_USED"
EXTERNAL_METRICS: tuple[str, ...] = (DCGM_GPU_UTIL, DCGM_FB_USED, "up", "ALERTS")
"""The only non-catalogue series the dashboard reads (NVIDIA DCGM exporter, Prometheus' own)."""

OMITTED: dict[str, str] = {}
"""Catalogue metrics deliberately without a panel (name -> reason). None today."""

_SCOPE_SOURCE: dict[str, str] = {"stream": "stream", "layer": "layer", "param": "param",
                                 "run": "run_signal"}
"""Catalogue ``source`` of an alert scope's signals (as in ``exporters.rules``)."""

_SEVERITY_COLOR: dict[str, str] = {"critical": "red", "warning": "orange", "info": "blue"}
_SEVERITY_RANK: dict[str, int] = {"info": 1, "warning": 2, "critical": 3}

_PANEL_W, _PANEL_H, _PER_ROW = 8, 8, 3

PLAIN_RATIOS: frozenset[str] = frozenset(PREFIX + n for n in (
    "embedding_std_ratio", "embedding_variance_ratio", "effective_rank_baseline_ratio",
    "activation_effective_rank_baseline_ratio"))
"""Catalogue ``ratio`` metrics that are a value over a reference (1: as much as the reference;
above 1 possible), not a fraction of a whole: shown as plain numbers (unit ``none``), not in
percent (``embedding_std_ratio`` ≈ 1 is healthy, not "100 %")."""

RISES: dict[str, str] = {PREFIX + "dormant_units_ratio_rise": PREFIX + "dormant_units_ratio"}
"""Metrics that are a difference of a fraction metric: shown in the unit of that metric."""


# ----------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """A dashboard row: a signal family."""

    key: str
    title: str
    collapsed: bool = False


FAMILIES: tuple[Family, ...] = (
    Family("spectrum", "Spectrum: effective rank (RankMe), alpha-ReQ, srank"),
    Family("collapse", "Collapse: complete (SimSiam std) and dimensional (rank vs peak)"),
    Family("plasticity", "Plasticity: dormant units and activation rank per layer"),
    Family("quality", "Quality: Q-Score and low-quality samples", collapsed=True),
    Family("neural_collapse", "Neural collapse NC1-NC4", collapsed=True),
    Family("gan", "GAN: generator mode collapse", collapsed=True),
    Family("weights", "Weights, gradients, early-bird tickets and curvature", collapsed=True),
    Family("health", "repwatch health"),
)

_FAMILY_BY_PREFIX: tuple[tuple[str, str], ...] = (
    ("neural_collapse_", "neural_collapse"),
    ("generator_", "gan"),
    ("qscore", "quality"),
    ("low_quality_", "quality"),
    ("negative_values_", "quality"),
    ("embedding_std_", "collapse"),
    ("mean_cosine_", "collapse"),
    ("effective_rank_peak", "collapse"),
)
"""Name prefixes (after ``repwatch_``) that pick a family; the first match wins."""

_FAMILY_BY_SOURCE: dict[str, str] = {"stream": "spectrum", "layer": "plasticity",
                                     "param": "weights", "run_signal": "weights"}
"""Family of the remaining metrics by catalogue source; anything else is repwatch's health."""


def family_of(spec: MetricSpec) -> str:
    """The family (row) of a catalogue metric: by name prefix, else by source."""
    short = spec.name.removeprefix(PREFIX)
    for prefix, fam in _FAMILY_BY_PREFIX:
        if short.startswith(prefix):
            return fam
    return _FAMILY_BY_SOURCE.get(spec.source, "health")


# ----------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class Threshold:
    """One alert condition on a metric: ``metric{variants} op value`` fires ``rule``."""

    rule: str
    severity: str
    op: str
    value: float
    variants: tuple[tuple[str, str], ...]
    prometheus_for: str


def alert_thresholds(rules: Sequence[AlertRule] = DEFAULT_RULES) -> dict[str, list[Threshold]]:
    """Metric name -> the alert thresholds on it (each rule's top-level conditions; the
    ``also`` parts are gates of a compound condition, not levels to draw)."""
    out: dict[str, list[Threshold]] = {}
    for rule in rules:
        for cond in rule.conditions:
            spec = metric_for_signal(cond.signal.signal, _SCOPE_SOURCE[rule.scope])
            out.setdefault(spec.name, []).append(Threshold(
                rule.name, rule.severity, cond.op, cond.threshold,
                cond.signal.labels, rule.prometheus_for))
    return out


def threshold_steps(thresholds: Sequence[Threshold]) -> list[dict[str, Any]]:
    """Grafana threshold steps: each interval between threshold values gets the colour of the
    worst severity whose condition holds there (green where none does)."""
    points = sorted({t.value for t in thresholds})
    if not points:
        return [{"color": "green", "value": None}]
    edges = [-math.inf, *points, math.inf]
    steps: list[dict[str, Any]] = []
    for i, lo in enumerate(edges[:-1]):
        hi = edges[i + 1]
        probe = (lo + hi) / 2 if math.isfinite(lo) and math.isfinite(hi) else (
            hi - 1.0 if not math.isfinite(lo) else lo + 1.0)
        held = [t for t in thresholds
                if (probe < t.value if t.op == "<" else probe > t.value)]
        color = "green"
        if held:
            worst = max(held, key=lambda t: _SEVERITY_RANK[t.severity])
            color = _SEVERITY_COLOR[worst.severity]
        step = {"color": color, "value": None if i == 0 else lo}
        if steps and steps[-1]["color"] == color:
            continue
        steps.append(step)
    return steps


def _threshold_note(thresholds: Sequence[Threshold]) -> str:
    parts = []
    for t in thresholds:
        where = "".join(f" ({k}={v} series)" for k, v in t.variants)
        parts.append(f"{t.rule} ({t.severity}) when {t.op} {t.value:g}{where} for "
                     f"{t.prometheus_for}")
    return "Threshold lines: alert " + "; ".join(parts) + "."


# ----------------------------------------------------------------------------- expressions


def _matchers(spec: MetricSpec, extra: Sequence[str] = ()) -> str:
    """``{run=~"$run", stream=~"$stream"}``: the variables this metric's labels take (not
    ``stream`` on ``alerts_firing``, where it may hold a layer or parameter)."""
    keys = ("run",) if spec.source == "alerts" else ("run", "stream", "layer")
    ms = [f'{lab}=~"${lab}"' for lab in keys if lab in spec.labels]
    return "{" + ", ".join([*ms, *extra]) + "}" if ms or extra else ""


def _legend(labels: Iterable[str]) -> str:
    return " ".join("{{" + lab + "}}" for lab in labels) or "__auto"


@dataclass
class _Target:
    expr: str
    legend: str


@dataclass
class _PanelSpec:
    title: str
    description: str
    targets: list[_Target]
    unit: str
    thresholds: list[Threshold] = field(default_factory=list)
    min: float | None = None
    soft: tuple[float, float] | None = None
    """Soft y-axis range (Grafana ``axisSoftMin``/``axisSoftMax``): always shown, widened by
    values outside it."""


def _title(spec: MetricSpec) -> str:
    return spec.name.removeprefix(PREFIX).replace("_", " ")


def _describe(spec: MetricSpec) -> str:
    return spec.help + (f" ({spec.paper})" if spec.paper else "") + f" Metric: {spec.name}."


def grafana_unit(spec: MetricSpec) -> str:
    """Grafana unit of a gauge: ``percentunit`` for fractions of a whole (and their rises),
    ``none`` for :data:`PLAIN_RATIOS`, ``s`` for seconds, else ``short``."""
    base = BY_NAME[RISES[spec.name]] if spec.name in RISES else spec
    if base.unit == "ratio":
        return "none" if base.name in PLAIN_RATIOS else "percentunit"
    return {"seconds": "s"}.get(base.unit, "short")


def metric_panel(spec: MetricSpec, thresholds: Sequence[Threshold] = ()) -> _PanelSpec:
    """The panel of one catalogue metric, shaped by its kind and unit."""
    labels = spec.labels
    if spec.kind == "counter":
        expr = (f"sum by ({', '.join(labels)}) (rate({spec.name}{_matchers(spec)}"
                f"[$__rate_interval]))") if labels else \
            f"sum(rate({spec.name}[$__rate_interval]))"
        return _PanelSpec(f"{_title(spec).removesuffix(' total')} /s",
                          _describe(spec) + " Per-second rate.",
                          [_Target(expr, _legend(labels))], "cps", min=0)
    if spec.kind == "histogram":
        keep = ", ".join([*labels, "le"])
        targets = [_Target(f"histogram_quantile({q}, sum by ({keep}) (rate({spec.name}_bucket"
                           f"{_matchers(spec)}[$__rate_interval])))",
                           _legend(labels) + f" p{round(q * 100)}") for q in (0.1, 0.5, 0.9)]
        return _PanelSpec(f"{_title(spec)} quantiles (rate of the histogram)",
                          _describe(spec) + " Quantiles of the per-sample values observed in "
                          "each interval.", targets, "short")
    if spec.unit == "seconds" and spec.name.endswith("_timestamp_seconds"):
        expr = f"time() - {spec.name}{_matchers(spec)}"
        return _PanelSpec(f"{_title(spec).removesuffix(' timestamp seconds')} age",
                          _describe(spec) + " Shown as seconds since then.",
                          [_Target(expr, _legend(labels))], "s", min=0)
    unit = grafana_unit(spec)
    note = f" {_threshold_note(thresholds)}" if thresholds else ""
    soft = (0, 1) if unit in ("percentunit", "none") and (
        spec.unit == "ratio" or spec.name in RISES) else None
    return _PanelSpec(_title(spec), _describe(spec) + note,
                      [_Target(f"{spec.name}{_matchers(spec)}", _legend(labels))], unit,
                      list(thresholds), soft=soft)


def run_pods() -> str:
    """One series per (namespace, pod) of the selected runs: the join that scopes a GPU series
    (dcgm-exporter) to the runs' pods."""
    return f'{metric_for_signal("time", "run").name}{{run=~"$run"}}'


def dcgm_expr(metric: str) -> str:
    """``metric`` of the GPUs used by the pods of the selected runs: ``and on(namespace, pod)``
    with the runs' series. Outside Kubernetes neither side has these labels (both empty), so
    every GPU matches."""
    return f"{metric} and on(namespace, pod) {run_pods()}"


def external_panels() -> list[_PanelSpec]:
    """Scrape health and the NVIDIA DCGM exporter's GPU panels ("No data" without it)."""
    dcgm = ("From the NVIDIA DCGM exporter (dcgm-exporter), scraped by the same Prometheus; "
            "'No data' where none runs. GPUs carry no run label: shown are the GPUs whose "
            "namespace and pod labels (dcgm-exporter's Kubernetes pod mapping; its "
            "ServiceMonitor needs honorLabels: true, else Prometheus renames them "
            "exported_namespace/exported_pod and no GPU matches) are a pod of the selected "
            "runs (the namespace/pod labels a PodMonitor scrape puts on repwatch's series, as "
            "in deploy/k8s). Without those labels on either side (outside Kubernetes) this "
            "cannot be scoped: every GPU Prometheus scrapes is shown, whichever run is "
            "selected.")
    return [
        _PanelSpec("scrape targets up (repwatch jobs)",
                   "Prometheus' own up series of scrape jobs named like repwatch: 1 up, 0 down "
                   "(alert RepwatchDown).",
                   [_Target('up{job=~".*repwatch.*"}', "{{job}} {{instance}}")], "short", min=0),
        _PanelSpec("GPU utilisation (DCGM)", f"{DCGM_GPU_UTIL}: GPU utilisation in percent. {dcgm}",
                   [_Target(dcgm_expr(DCGM_GPU_UTIL), "{{Hostname}} GPU {{gpu}} {{pod}}")],
                   "percent", min=0),
        _PanelSpec("GPU memory used (DCGM)", f"{DCGM_FB_USED}: framebuffer memory used, MiB. {dcgm}",
                   [_Target(dcgm_expr(DCGM_FB_USED), "{{Hostname}} GPU {{gpu}} {{pod}}")],
                   "mbytes", min=0),
    ]


# ----------------------------------------------------------------------------- JSON


def _panel_json(p: _PanelSpec, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": p.unit,
        "color": {"mode": "palette-classic"},
        "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 0, "showPoints": "never",
                   "spanNulls": False,
                   "thresholdsStyle": {"mode": "line" if p.thresholds else "off"}},
        "thresholds": {"mode": "absolute", "steps": threshold_steps(p.thresholds)},
    }
    if p.min is not None:
        defaults["min"] = p.min
    if p.soft is not None:
        defaults["custom"]["axisSoftMin"], defaults["custom"]["axisSoftMax"] = p.soft
    return {
        "type": "timeseries",
        "id": pid,
        "title": p.title,
        "description": p.description,
        "datasource": dict(DS),
        "gridPos": {"h": _PANEL_H, "w": _PANEL_W, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": dict(DS), "editorMode": "code",
                     "expr": t.expr, "legendFormat": t.legend, "range": True}
                    for i, t in enumerate(p.targets)],
    }


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "type": "query", "name": name, "label": label, "datasource": dict(DS),
        "definition": query, "query": {"query": query, "refId": "StandardVariableQuery"},
        "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [], "regex": "", "sort": 1, "hide": 0, "skipUrlSync": False,
    }


def templating() -> list[dict[str, Any]]:
    """The ``datasource``, ``run``, ``stream`` and ``layer`` variables."""
    run_metric = metric_for_signal("time", "run").name        # one series per run: cheap
    stream_metric = metric_for_signal("window_samples", "stream").name
    layer_metric = metric_for_signal("window_samples", "layer").name
    return [
        {"type": "datasource", "name": "datasource", "label": "Prometheus", "query": "prometheus",
         "current": {}, "options": [], "refresh": 1, "regex": "", "hide": 0,
         "skipUrlSync": False},
        _variable("run", "run", f"label_values({run_metric}, run)"),
        _variable("stream", "stream", f'label_values({stream_metric}{{run=~"$run"}}, stream)'),
        _variable("layer", "layer", f'label_values({layer_metric}{{run=~"$run"}}, layer)'),
    ]


def annotations() -> list[dict[str, Any]]:
    """Grafana's built-in annotations and the firing repwatch alerts of the selected runs."""
    return [
        {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
         "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
         "name": "Annotations & Alerts", "type": "dashboard"},
        {"name": "repwatch alerts", "datasource": dict(DS), "enable": True, "hide": False,
         "iconColor": "red",
         "expr": 'ALERTS{alertname=~"Repwatch.*", alertstate="firing", run=~"$run"}',
         "step": "1m", "titleFormat": "{{alertname}} ({{severity}})",
         "textFormat": "run {{run}} {{stream}}{{layer}}{{param}}",
         "tagKeys": "alertname,severity", "useValueForTime": False},
    ]


def _family_panels(thresholds: dict[str, list[Threshold]]) -> dict[str, list[_PanelSpec]]:
    fams: dict[str, list[_PanelSpec]] = {f.key: [] for f in FAMILIES}
    for spec in CATALOGUE:
        if spec.name in OMITTED:
            continue
        fams[family_of(spec)].append(metric_panel(spec, thresholds.get(spec.name, ())))
    fams["health"].extend(external_panels())
    return fams


def render_dashboard(rules: Sequence[AlertRule] = DEFAULT_RULES) -> dict[str, Any]:
    """The dashboard as Grafana's classic JSON model (deterministic)."""
    fams = _family_panels(alert_thresholds(rules))
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for fam in FAMILIES:
        specs = fams[fam.key]
        if not specs:
            continue
        row: dict[str, Any] = {"type": "row", "id": pid, "title": fam.title,
                               "collapsed": fam.collapsed,
                               "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []}
        pid, y = pid + 1, y + 1
        children = []
        for i, spec in enumerate(specs):
            x = (i % _PER_ROW) * _PANEL_W
            children.append(_panel_json(spec, pid, x, y + (i // _PER_ROW) * _PANEL_H))
            pid += 1
        y += math.ceil(len(specs) / _PER_ROW) * _PANEL_H
        if fam.collapsed:                 # a collapsed row holds its panels (queried on expand)
            row["panels"] = children
            panels.append(row)
        else:
            panels.extend([row, *children])
    return {
        "uid": DASHBOARD_UID,
        "title": DASHBOARD_TITLE,
        "description": "Representation health of training runs (repwatch): spectrum, collapse, "
                       "plasticity, Q-Score, neural collapse, GAN mode collapse, and repwatch's "
                       "own health. Generated by `repwatch dashboard`; do not edit by hand.",
        "tags": ["repwatch", "training", "representations"],
        "editable": True,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "weekStart": "",
        "version": 1,
        "links": [],
        "annotations": {"list": annotations()},
        "templating": {"list": templating()},
        "panels": panels,
    }


def render_json(rules: Sequence[AlertRule] = DEFAULT_RULES) -> str:
    """The dashboard file's text: :func:`render_dashboard` as indented JSON, newline-ended."""
    return json.dumps(render_dashboard(rules), indent=2, ensure_ascii=False) + "\n"


def iter_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows and the panels inside collapsed rows included."""
    out: list[dict[str, Any]] = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every query: panel targets, variable queries (the selector inside
    ``label_values``) and annotation queries. Grafana variables are left in place."""
    out: list[tuple[str, str]] = []
    for p in iter_panels(dashboard):
        for t in p.get("targets", []):
            out.append((f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"]))
    for v in dashboard["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", v["definition"])
        if m is None:
            raise ValueError(f"variable {v['name']}: not a label_values(selector, label) query: "
                             f"{v['definition']!r}")
        out.append((f"variable {v['name']}", m.group(1)))
    for a in dashboard["annotations"]["list"]:
        if "expr" in a:
            out.append((f"annotation {a['name']!r}", a["expr"]))
    return out


# ----------------------------------------------------------------------------- Grafana alerts


def grafana_alert_rules(datasource_uid: str = DATASOURCE_UID, folder_uid: str = FOLDER_UID,
                        group: str = RULE_GROUP, org_id: int = 1) -> list[dict[str, Any]]:
    """Grafana-managed alert rules (provisioning API model) from ``exporters.rules.render_rules``.

    Each keeps the Prometheus rule's ``expr``, ``for``, labels and annotations; the query is
    followed by Grafana's own conversion of a Prometheus rule (``pkg/services/ngalert/prom``):
    a math node ``is_number($query) || is_nan($query) || is_inf($query)`` and a threshold node
    ``> 0``, so any series the expression returns fires, like in Prometheus. ``keep_firing_for``
    is not carried over (the provisioning API of older Grafana versions has no such field). The
    UID is the lower-cased alert name (stable, at most 40 characters)."""
    from exporters.rules import render_rules

    out = []
    for group_data in render_rules()["groups"]:
        for r in group_data["rules"]:
            uid = r["alert"].lower()
            if not re.fullmatch(r"[a-z0-9_-]{1,40}", uid):
                raise ValueError(f"alert {r['alert']!r} gives no valid Grafana UID ({uid!r})")
            out.append({
                "uid": uid,
                "title": r["alert"],
                "ruleGroup": group,
                "folderUID": folder_uid,
                "orgID": org_id,
                "condition": "threshold",
                "data": [
                    {"refId": "query", "datasourceUid": datasource_uid, "queryType": "",
                     "relativeTimeRange": {"from": 600, "to": 0},
                     "model": {"refId": "query", "expr": r["expr"], "instant": True,
                               "range": False,
                               "datasource": {"type": "prometheus", "uid": datasource_uid}}},
                    {"refId": "prometheus_math", "datasourceUid": "__expr__", "queryType": "math",
                     "model": {"refId": "prometheus_math", "type": "math",
                               "expression": "is_number($query) || is_nan($query) || "
                                             "is_inf($query)",
                               "datasource": {"type": "__expr__", "uid": "__expr__"}}},
                    {"refId": "threshold", "datasourceUid": "__expr__",
                     "queryType": "threshold",
                     "model": {"refId": "threshold", "type": "threshold",
                               "expression": "prometheus_math",
                               "conditions": [{"evaluator": {"type": "gt", "params": [0]}}],
                               "datasource": {"type": "__expr__", "uid": "__expr__"}}},
                ],
                "noDataState": "OK",
                "execErrState": "Error",
                "for": r.get("for", "0s"),
                "labels": dict(r["labels"]),
                "annotations": dict(r["annotations"]),
                "isPaused": False,
            })
    return out


# ----------------------------------------------------------------------------- push


class PushError(Exception):
    """A push failed; the message is one line meant for the operator."""


@dataclass
class PushResult:
    """What a push did."""

    folder_created: bool
    dashboard_version: int | None
    dashboard_url: str
    rules_created: list[str] = field(default_factory=list)
    rules_updated: list[str] = field(default_factory=list)


def _status(exc: BaseException) -> int:
    return int(getattr(exc, "status_code", 0) or 0)


def _explain(exc: BaseException, url: str, what: str) -> PushError:
    """A one-line PushError for a failed request (grafana-client / niquests exceptions)."""
    from grafana_client.client import GrafanaException, GrafanaTimeoutError

    code = _status(exc)
    if isinstance(exc, GrafanaTimeoutError) or code == 0 or (
            isinstance(exc, OSError) and not isinstance(exc, GrafanaException)):
        return PushError(f"Grafana at {url} is unreachable ({what}): {_reason(exc)}")
    if code in (401, 403):
        return PushError(f"Grafana at {url}: token rejected (HTTP {code} on {what}); check "
                         "the token file and that the service account may edit dashboards, "
                         "folders and alert rules")
    if code == 412:
        return PushError(f"Grafana at {url} refused {what}: version mismatch (HTTP 412: "
                         f"{_message(exc)}); the dashboard was changed there, push again "
                         "to overwrite it")
    return PushError(f"Grafana at {url} refused {what}: HTTP {code}: {_message(exc)}")


def _message(exc: BaseException) -> str:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict) and resp.get("message"):
        return _one_line(resp["message"])
    return _one_line(getattr(exc, "message", "") or exc)


def _reason(exc: BaseException) -> str:
    """The OS-level reason of a connection failure (``[Errno 111] Connection refused``)."""
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    return _one_line(m.group(0) if m else text or type(exc).__name__)


def _one_line(x: object) -> str:
    return " ".join(str(x).split())[:300]


def _call(url: str, what: str, fn: Callable[[], Any], missing_ok: bool = False) -> Any:
    """Run one request; 404 gives None when ``missing_ok``; other failures a PushError."""
    try:
        return fn()
    except Exception as exc:  # grafana-client raises its own and niquests' exceptions
        if missing_ok and _status(exc) == 404:
            return None
        raise _explain(exc, url, what) from exc


def read_token(path: str) -> str:
    """The API token in ``path`` (service-account token), stripped; PushError if none."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise PushError(f"cannot read the token file {path}: {exc.strerror or exc}") from exc
    if not token or any(c.isspace() for c in token):
        raise PushError(f"the token file {path} must hold one token (got "
                        f"{'nothing' if not token else 'whitespace inside'})")
    return token


def push(url: str, token: str, *, folder: str = "repwatch", alerts: bool = False,
         insecure: bool = False, datasource_uid: str = DATASOURCE_UID,
         timeout: float = 10.0) -> PushResult:
    """Push the dashboard (and with ``alerts`` the Grafana-managed alert rules) to Grafana.

    Idempotent: the folder (UID ``repwatch``, title ``folder``) is created only when missing;
    the dashboard is saved with ``overwrite: true`` (Grafana bumps its version); a rule is
    created (POST) when its UID is new and updated (PUT) otherwise, always with
    ``X-Disable-Provenance`` so it stays editable in the UI.
    """
    try:
        from grafana_client import GrafanaApi
    except ImportError as exc:
        raise PushError("repwatch grafana push needs grafana-client: "
                        "pip install 'repwatch[grafana]'") from exc
    if not re.match(r"https?://[^/\s]+", url):
        raise PushError(f"--url must be an http(s) URL of Grafana, got {url!r}")
    api = GrafanaApi.from_url(url, credential=token, timeout=timeout)
    if insecure:
        api.client.verify = False

    created = False
    if _call(url, "reading the folder", lambda: api.folder.get_folder(FOLDER_UID),
             missing_ok=True) is None:
        _call(url, "creating the folder",
              lambda: api.folder.create_folder(folder, uid=FOLDER_UID))
        created = True
    payload = {"dashboard": {**render_dashboard(), "id": None}, "folderUid": FOLDER_UID,
               "overwrite": True, "message": "repwatch grafana push"}
    saved = _call(url, "saving the dashboard", lambda: api.dashboard.update_dashboard(payload))
    saved = saved if isinstance(saved, dict) else {}
    result = PushResult(created, saved.get("version"),      # Grafana's url holds any subpath
                        urljoin(url, str(saved.get("url", f"/d/{DASHBOARD_UID}"))))
    if alerts:
        prov = api.alertingprovisioning
        for rule in grafana_alert_rules(datasource_uid):
            uid = rule["uid"]
            if _call(url, f"reading alert rule {uid}", lambda uid=uid: prov.get_alertrule(uid),
                     missing_ok=True) is None:
                _call(url, f"creating alert rule {uid}",
                      lambda rule=rule: prov.create_alertrule(rule, disable_provenance=True))
                result.rules_created.append(uid)
            else:
                _call(url, f"updating alert rule {uid}",
                      lambda uid=uid, rule=rule: prov.update_alertrule(
                          uid, rule, disable_provenance=True))
                result.rules_updated.append(uid)
    return result

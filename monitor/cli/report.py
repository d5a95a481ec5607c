"""``repwatch report``: one offline HTML page from the JSONL history of one or more runs.

::

    repwatch report run.jsonl -o report.html               # one run
    repwatch report a.jsonl b.jsonl -o cmp.html            # two runs, overlaid per signal

The logs are what ``Monitor(log_path=...)`` writes (:mod:`monitor.history` reads them). The page
is one self-contained file: its CSS is the dashboard's ``app.css``, its charts are drawn by the
dashboard's own renderer (the drawing sections of ``app.js``, inlined) plus ``report.js``, and
the data is embedded as JSON; it loads nothing (a Content-Security-Policy with
``default-src 'none'`` forbids any request), so it can be mailed, archived or opened offline.

What it shows, like the live dashboard but over the whole history: a table of the runs (file,
steps, publishes, samples scored per stream, errors, dropped rows, alerts), every alert episode
(from the step it fired to the step it resolved, or still firing at the end) with its
description and runbook reference, one chart per signal for every stream, activation layer,
parameter and model-level signal (the important ones first, the rest under "more signals"),
with dotted lines where alerts fired and resolved, and, when the logs hold spectra
(``to_dict(spectra=True)``; the Monitor's log does not), each stream's eigenvalue spectrum at
its first publish, at its peak effective rank and at the end. With several logs (or one log
holding several runs or ``per_rank`` ranks) each run gets a colour and each chart overlays the
runs, on the training step.

Each run is drawn from :func:`monitor.history.timeline` (a resume's abandoned steps are left out
and noted). A run with more than ``--max-points`` publishes is thinned to about that many,
evenly over steps, always keeping the first and last publish and those where an alert fired or
resolved (a spike between kept publishes can disappear; ``--max-points 0`` keeps all). Values
are embedded to 6 significant digits. Torch-free.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from monitor._version import __version__
from monitor.cli.argtypes import non_negative_int
from monitor.history import HistoryError, alert_episodes, by_run, read, timeline
from monitor.snapshot import SCOPES, Snapshot

DEFAULT_MAX_POINTS = 4000
"""Publishes drawn per run at most by default (the live dashboard keeps 2000)."""

DRAWING_START = "// ---------- signals ----------"
DRAWING_END = "// ---------- data ----------"
"""The part of the dashboard's ``app.js`` the report reuses: from its signal lists (``LABELS``,
``PRIMARY``, ``yReference``) and formatting helpers to its chart cards (``fmt``, ``el``,
``svgEl``, ``finite``, the scales, ``drawChart``, ``card``, ``legend``, ``color``)."""

CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "img-src data:; base-uri 'none'; form-action 'none'")
"""The page's Content-Security-Policy: inline code only, no request of any kind."""


class ReportError(ValueError):
    """A report that cannot be made (no snapshots, the dashboard's code not found, ...)."""


@dataclass
class ReportRun:
    """One run on the page: its ``label``, the ``file`` it came from and its snapshots in
    the order written (:func:`monitor.history.timeline` is applied when the page is built)."""

    label: str
    file: str
    snapshots: list[Snapshot]


def _web(name: str) -> str:
    return resources.files("monitor").joinpath("server", "web", name).read_text(encoding="utf-8")


def drawing_code() -> str:
    """The dashboard's drawing code, cut from ``app.js`` between :data:`DRAWING_START` and
    :data:`DRAWING_END` (ReportError when app.js no longer has those markers)."""
    app = _web("app.js")
    start, end = app.find(DRAWING_START), app.find(DRAWING_END)
    if start < 0 or end < start:
        raise ReportError("monitor/server/web/app.js no longer has the sections the report "
                          f"reuses ({DRAWING_START!r} … {DRAWING_END!r}); update "
                          "monitor/cli/report.py:drawing_code")
    return app[start:end]


def _script() -> str:
    js = ('"use strict";\n(function () {\n'
          '  const SVGNS = "http://www.w3.org/2000/svg";\n'
          '  const state = { hover: {} };              // drawChart keeps hover positions here\n'
          '  const $ = (id) => document.getElementById(id);\n'
          f'  {drawing_code()}\n{_web("report.js")}\n}})();\n')
    if "</script" in js.lower():
        raise ReportError("the report's script contains '</script'; it cannot be inlined")
    return js


_EXTRA_CSS = """
.report-head h1 { font-size: 1.15rem; margin: 0; }
.report-head .gen { color: var(--muted); font-size: 0.8rem; }
table.runs { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
table.runs th, table.runs td { text-align: left; padding: 0.2rem 0.6rem 0.2rem 0; border-bottom: 1px solid var(--grid); overflow-wrap: anywhere; }
table.runs th { font-size: 0.72rem; color: var(--muted); text-transform: uppercase; font-weight: 600; }
table.runs td.bad { color: var(--crit); }
.swatch { display: inline-block; width: 14px; height: 0; border-top: 3px solid; vertical-align: middle; margin-right: 0.35rem; }
.notes { color: var(--muted); font-size: 0.8rem; margin: 0.4rem 0 0; padding-left: 1.2rem; }
.alerts li.info { border-color: var(--accent); }
.alerts li.resolved-ok .name { color: var(--muted); }
svg .marker.info { stroke: var(--accent); }
svg .marker.resolved { stroke: var(--ok); stroke-dasharray: 1 3; }
#no-spectra { grid-column: 1 / -1; }
.chart .now { max-width: 60%; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
"""

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<meta name="generator" content="repwatch {version}">
<title>{title}</title>
<link rel="icon" href="data:,">
<style>
{css}
</style>
</head>
<body>
<header class="top report-head">
  <div class="brand"><span class="logo" aria-hidden="true">◆</span> repwatch report</div>
  <div><h1 id="title">{title}</h1><div class="gen" id="generated"></div></div>
  <button id="theme" class="theme" type="button" title="Theme: auto / dark / light">◐ auto</button>
</header>
<main>
  <section class="panel" aria-labelledby="runs-h">
    <h2 id="runs-h">Runs</h2>
    <table class="runs"><thead><tr><th>run</th><th>log</th><th>steps</th><th>publishes</th>
      <th title="the largest count of the run's streams (each scores the same rows)">samples scored / stream</th><th>errors</th><th>dropped</th><th>alerts</th></tr></thead>
      <tbody id="runs-body"></tbody></table>
    <ul class="notes" id="run-notes"></ul>
  </section>
  <section class="panel" aria-labelledby="alerts-h">
    <h2 id="alerts-h">Alerts</h2>
    <ul id="alerts" class="alerts"></ul>
  </section>
  <section class="panel" aria-labelledby="spectra-h">
    <h2 id="spectra-h">Eigenvalue spectra</h2>
    <p class="hint">Eigenvalues of the window's second moment S/n, largest first, log scale, at
      a stream's first logged spectrum, at its peak effective rank (dashed) and at the end.
      Zeros are drawn at 10⁻⁹ of the top eigenvalue.</p>
    <div id="spectra" class="grid"></div>
  </section>
  <div id="groups"></div>
</main>
<footer class="foot">repwatch {version} · a static report: hover a chart for values; dotted
  lines mark where an alert fired (red: critical, amber: warning) and resolved (green).</footer>
<noscript><p class="panel">This report draws its charts with JavaScript.</p></noscript>
<script id="repwatch-data" type="application/json">{data}</script>
<script>
{script}
</script>
</body>
</html>
"""


def _num(v: Any) -> float | int | None:
    """A value for the page: None for NaN/±Inf/missing, 6 significant digits."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if not isinstance(v, float) or not math.isfinite(v):
        return None
    return float(f"{v:.6g}")


def _thin(snaps: list[Snapshot], max_points: int) -> list[Snapshot]:
    """About ``max_points`` of ``snaps`` evenly spread, keeping the first, the last and those
    where the set of firing alerts changes (all of them for ``max_points`` 0)."""
    n = len(snaps)
    if max_points <= 0 or n <= max_points:
        return snaps
    stride = math.ceil(n / max_points)
    keep = set(range(0, n, stride)) | {n - 1}
    prev: set[tuple[str, str, str, int]] = set()
    for i, s in enumerate(snaps):
        now = {(a.name, a.scope, a.stream, a.since_step) for a in s.alerts}
        if now != prev:
            keep.add(i)
            if i:
                keep.add(i - 1)
        prev = now
    return [snaps[i] for i in sorted(keep)]


def _resumes(snaps: list[Snapshot]) -> list[dict[str, int]]:
    return [{"step": s.step, "from": s.resumed_from} for s in snaps if s.resumed_from is not None]


def _spectra(snaps: list[Snapshot]) -> dict[str, list[dict[str, Any]]]:
    """Per stream: its first logged spectrum, the one at its peak effective rank, the last."""
    out: dict[str, list[dict[str, Any]]] = {}
    names = sorted({n for s in snaps for n in s.spectra})
    for name in names:
        having = [s for s in snaps if s.spectra.get(name)]

        def rank(s: Snapshot) -> float:
            v = s.streams.get(name, {}).get("effective_rank", math.nan)
            return v if isinstance(v, (int, float)) and math.isfinite(v) else -math.inf

        peak = max(having, key=rank)
        picks: list[tuple[str, Snapshot]] = [("first", having[0])]
        if rank(peak) > -math.inf:
            picks.append(("peak", peak))
        picks.append(("last", having[-1]))
        seen: set[tuple[str, int]] = set()
        out[name] = []
        for what, s in picks:
            if (what, s.step) in seen:
                continue
            seen.add((what, s.step))
            out[name].append({"what": what, "step": s.step,
                              "effective_rank": _num(s.streams.get(name, {}).get("effective_rank")),
                              "eigenvalues": [_num(v) for v in s.spectra[name]]})
    return out


def _run_data(run: ReportRun, max_points: int) -> dict[str, Any]:
    line = timeline(run.snapshots)
    if not line:
        raise ReportError(f"{run.file}: no snapshots for run {run.label!r}")
    shown = _thin(line, max_points)
    last = line[-1]
    episodes = alert_episodes(line)
    groups: dict[str, dict[str, dict[str, list[Any]]]] = {}
    for scope in SCOPES:
        entities: dict[str, dict[str, list[Any]]] = {}
        for i, snap in enumerate(shown):
            for name, values in snap.group(scope).items():
                extra = snap.counters.get(name, {}) if scope == "stream" else {}
                sigs = entities.setdefault(name, {})
                for key, v in (*values.items(), *extra.items()):
                    ys = sigs.get(key)
                    if ys is None:
                        ys = sigs[str(key)] = [None] * len(shown)
                    ys[i] = _num(v)
        if entities:
            groups[scope] = entities
    counters = last.counters.values()
    return {
        "label": run.label, "run": last.run, "rank": last.rank, "file": run.file,
        "publishes": len(line), "shown": len(shown),
        "first_step": line[0].step, "last_step": last.step,
        "first_time": _num(line[0].time), "last_time": _num(last.time),
        # every stream scores the same rows: per stream (the largest), not their sum
        "samples": _num(max((float(c["samples"]) for c in counters if "samples" in c),
                            default=math.nan)),
        "samples_by": {k: _num(c.get("samples")) for k, c in last.counters.items()},
        "errors": sum(last.errors.values()), "errors_by": dict(last.errors),
        "dropped": _num(sum(float(v) for v in last.dropped.values())),
        "dropped_by": {k: _num(v) for k, v in last.dropped.items()},
        "resumes": _resumes(line),
        "steps": [s.step for s in shown],
        "groups": groups,
        "alerts": [{**{k: (_num(v) if k == "value" else v) for k, v in ep.alert.to_dict().items()},
                    "first_step": ep.first_step, "last_step": ep.last_step,
                    "resolved_step": ep.resolved_step} for ep in episodes],
        "spectra": _spectra(line),
    }


def render_html(runs: Sequence[ReportRun], *, title: str | None = None,
                max_points: int = DEFAULT_MAX_POINTS) -> str:
    """The report page of ``runs`` (one: a run's report; several: overlaid per signal)."""
    if not runs:
        raise ReportError("no run to report")
    if title is None:
        title = (f"{runs[0].label}" if len(runs) == 1
                 else " vs ".join(r.label for r in runs))
    data = {
        "title": title, "version": __version__,
        "generated": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "runs": [_run_data(r, max_points) for r in runs],
    }
    # strict JSON (no NaN) with "<" escaped, so no "</script>" or "<!--" can end the element
    text = json.dumps(data, allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")
    return _PAGE.format(csp=CSP, version=html.escape(__version__), title=html.escape(title),
                        css=_web("app.css") + _EXTRA_CSS, data=text, script=_script())


def load_runs(paths: Sequence[str | os.PathLike[str]], labels: Sequence[str] = (),
              skip_malformed: bool = False) -> list[ReportRun]:
    """The runs of the logs at ``paths`` (a log holding several runs or ranks gives one run
    each), labelled by ``labels`` (one per run, in order) or else by run name, made unique
    with the file name where two runs share a name."""
    runs: list[ReportRun] = []
    for path in paths:
        snaps = read(path, skip_malformed=skip_malformed)
        if not snaps:
            raise ReportError(f"{os.fspath(path)}: no snapshots (an empty log?)")
        for (run, rank), group in by_run(snaps).items():
            name = run if rank is None else f"{run} rank {rank}"
            runs.append(ReportRun(label=name, file=os.fspath(path), snapshots=group))
    if labels:
        if len(labels) != len(runs):
            raise ReportError(f"{len(labels)} --label given for {len(runs)} runs "
                              f"({', '.join(r.label for r in runs)})")
        for r, label in zip(runs, labels, strict=True):
            r.label = label
        return runs
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1:
            r.label = f"{r.label} ({Path(r.file).name})"
    seen: dict[str, int] = {}
    for r in runs:                                     # same run name in the same file twice
        seen[r.label] = seen.get(r.label, 0) + 1
        if seen[r.label] > 1:
            r.label = f"{r.label} #{seen[r.label]}"
    return runs


def write_report(paths: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                 labels: Sequence[str] = (), title: str | None = None,
                 max_points: int = DEFAULT_MAX_POINTS, skip_malformed: bool = False
                 ) -> list[ReportRun]:
    """Read the logs at ``paths`` and write their report to ``out``; returns the runs."""
    runs = load_runs(paths, labels, skip_malformed=skip_malformed)
    page = render_html(runs, title=title, max_points=max_points)
    Path(out).write_text(page, encoding="utf-8")
    return runs


def _run(args: argparse.Namespace) -> int:
    try:
        runs = write_report(args.logs, args.out, labels=args.label or (), title=args.title,
                            max_points=args.max_points, skip_malformed=args.skip_malformed)
    except (OSError, HistoryError, ReportError) as exc:
        print(f"repwatch report: error: {exc}", file=sys.stderr)
        return 2
    n = sum(len(timeline(r.snapshots)) for r in runs)
    print(f"wrote {args.out}: {len(runs)} run(s) ({', '.join(r.label for r in runs)}), "
          f"{n} publishes")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``repwatch report`` on the CLI's subparsers."""
    p = sub.add_parser("report", help="offline HTML report of one or more JSONL run logs "
                                      "(Monitor(log_path=...)); several runs are overlaid",
                       description="Write one offline HTML page (charts, alerts, spectra when "
                                   "logged) from the JSONL logs that Monitor(log_path=...) "
                                   "writes; with several runs, each chart overlays them.")
    p.add_argument("logs", nargs="+", metavar="LOG.jsonl",
                   help="a JSONL log written by Monitor(log_path=...); several: compared")
    p.add_argument("-o", "--out", default="report.html", metavar="PATH",
                   help="the HTML file to write (default: report.html)")
    p.add_argument("--title", default=None, help="page title (default: the run names)")
    p.add_argument("--label", action="append", default=None, metavar="NAME",
                   help="a name per run, in order (repeat; default: the run names)")
    p.add_argument("--max-points", type=non_negative_int, default=DEFAULT_MAX_POINTS, metavar="N",
                   help=f"thin each run to about N publishes (default {DEFAULT_MAX_POINTS}; "
                        "0: all)")
    p.add_argument("--skip-malformed", action="store_true",
                   help="skip lines that are not snapshots (with a warning) instead of failing")
    p.set_defaults(func=_run)

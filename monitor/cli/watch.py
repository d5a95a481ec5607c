"""The terminal view: a compact live table of a run's health (``repwatch watch URL``, the demo).

Torch-free (the sidecar image has no torch): it reads snapshot dicts, as
:meth:`monitor.snapshot.Snapshot.to_dict` writes them and ``/v1/runs`` and
``/v1/runs/{run}/history`` serve them, and renders a :class:`rich.table.Table`: one row per
(run, stream or activation layer) with the step, effective rank and a sparkline of its history,
the embedding std ratio, the dormant fraction (layers), the low-quality (Q-Score) fraction and
the firing alerts; the caption gives samples scored, dropped rows and errors per run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from exporters.catalogue import BY_NAME, PREFIX
from monitor.alerts import DEFAULT_RULES
from monitor.snapshot import SignalKey

SPARK_CHARS = "▁▂▃▄▅▆▇█"
"""Eight levels, lowest first; a missing (None/NaN) value is a space."""
SPARK_WIDTH = 24
HISTORY_LIMIT = 120
"""Snapshots of history a view keeps (and asks a server for) per run."""

# the snapshot keys of the shown signals, from the catalogue (the one list of metrics)
RANK = BY_NAME[PREFIX + "effective_rank"].signal             # streams; layers share the key
STD_RATIO = BY_NAME[PREFIX + "embedding_std_ratio"].signal
LOW_QUALITY = BY_NAME[PREFIX + "low_quality_samples_ratio"].signal
DORMANT = BY_NAME[PREFIX + "dormant_units_ratio"].signal

Snap = Mapping[str, Any]
"""A snapshot as a JSON-ready dict (``Snapshot.to_dict()``; NaN as None)."""


def _default_tau() -> float:
    """The τ of the dormant fraction that the plasticity alert reads (0.1 in the spec)."""
    for rule in DEFAULT_RULES:
        for cond in rule.conditions:
            labels = cond.signal.label_dict
            if cond.signal.signal == DORMANT and "tau" in labels:
                return float(labels["tau"])
    return 0.1


DORMANT_TAU: float = _default_tau()


def _finite(v: object) -> float | None:
    """``v`` as a float when it is a finite number, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:                   # an int too large for a float (JSON allows it)
        return None
    return f if math.isfinite(f) else None


def resample(values: Sequence[float | None], width: int) -> list[float | None]:
    """``values`` squeezed to ``width`` points: point i is the mean of the finite values in
    ``values[i*n//width : (i+1)*n//width]`` (None when it has none); shorter input is returned
    as is (missing values as None)."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    n = len(values)
    clean = [_finite(v) for v in values]
    if n <= width:
        return clean
    out: list[float | None] = []
    for i in range(width):
        chunk = [v for v in clean[i * n // width:(i + 1) * n // width] if v is not None]
        out.append(sum(chunk) / len(chunk) if chunk else None)
    return out


def sparkline(values: Sequence[float | None], width: int = SPARK_WIDTH) -> str:
    """A unicode sparkline of ``values`` (oldest first), at most ``width`` characters.

    The minimum maps to ``▁``, the maximum to ``█``, linearly in between (rounded to the
    nearest of eight levels); a constant series is drawn at mid height (``▄``); None and
    non-finite values are gaps (a space). Series longer than ``width`` are resampled by
    :func:`resample` (bucket means).
    """
    points = resample(values, width)
    finite = [v for v in points if v is not None]
    if not finite:
        return " " * len(points)
    lo, hi = min(finite), max(finite)
    top = len(SPARK_CHARS) - 1
    chars = []
    for v in points:
        if v is None:
            chars.append(" ")
        elif hi == lo:
            chars.append(SPARK_CHARS[top // 2])
        else:
            chars.append(SPARK_CHARS[min(top, max(0, round((v - lo) / (hi - lo) * top)))])
    return "".join(chars)


def fmt_rank(v: object) -> str:
    """Effective rank with one decimal (``–`` when missing)."""
    f = _finite(v)
    return "–" if f is None else f"{f:.1f}"


def fmt_ratio(v: object) -> str:
    """A ratio with three significant digits (``–`` when missing)."""
    f = _finite(v)
    return "–" if f is None else f"{f:.3g}"


def short_alert(name: str) -> str:
    """An alert name without the ``Repwatch`` prefix (the table's alerts column)."""
    return name.removeprefix("Repwatch") or name


def spark_width(console_width: int) -> int:
    """Sparkline width that lets the table fit ``console_width`` columns (8 to 24)."""
    return max(8, min(SPARK_WIDTH, console_width - 82))


def _total(values: Mapping[str, Any] | None) -> float:
    return sum(f for f in (_finite(v) for v in (values or {}).values()) if f is not None)


def _count(v: float) -> str:
    return f"{v:,.0f}"


def shown(value: object) -> str:
    """Text from a server, safe for a terminal: control characters (escape sequences, bells)
    made visible as ``\\x1b``-style escapes. Cells built from it are :class:`Text`, so rich
    markup in a name is shown as typed."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _rows(snap: Snap) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(scope, name, values) of the streams, then the layers of ``snap``."""
    rows: list[tuple[str, str, Mapping[str, Any]]] = []
    for scope, key in (("stream", "streams"), ("layer", "layers")):
        for name, values in sorted((snap.get(key) or {}).items()):
            rows.append((scope, name, values or {}))
    return rows


def build_table(status: Sequence[Snap], histories: Mapping[str, Sequence[Snap]] | None = None,
                *, width: int = SPARK_WIDTH, tau: float = DORMANT_TAU,
                title: str | None = "repwatch", note: str | None = None) -> Table:
    """The terminal view of runs ``status`` (latest snapshot dicts, as ``/v1/runs`` serves
    them) with ``histories`` (run → snapshot dicts, oldest first) for the sparklines.

    One row per (run, stream or layer), its firing alerts (matched by scope and name) in red;
    the caption gives each run's samples scored (sum over its streams), dropped rows, errors
    and every firing alert in full (parameter- and model-scoped ones have no row). ``note``
    adds a last caption line (e.g. a poll error)."""
    histories = histories or {}
    dormant_key = SignalKey.of(DORMANT, tau=tau)
    runs = {shown(snap.get("run", "")) for snap in status}
    many = len(runs) > 1
    if title is not None and len(runs) == 1:
        title = f"{title} · run {next(iter(runs))}"
    table = Table(title=Text(title) if title is not None else None, title_justify="left", caption_justify="left", expand=False,
                  header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    if many:
        table.add_column("run", overflow="fold")
    layers = any(snap.get("layers") for snap in status)
    table.add_column("stream/layer" if layers else "stream", overflow="fold")
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("eff.\nrank", justify="right", no_wrap=True)
    table.add_column("history", min_width=width, max_width=width, no_wrap=True, style="cyan")
    table.add_column("std\nratio", justify="right", no_wrap=True)
    table.add_column(f"dormant\nτ={tau:g}", justify="right", no_wrap=True)
    table.add_column("low-\nquality", justify="right", no_wrap=True)
    table.add_column("alerts", min_width=8, overflow="fold")
    caption: list[Text] = []
    for snap in status:
        raw_run = snap.get("run", "")
        run = shown(raw_run)
        past = list(histories.get(str(raw_run), ()))
        if not past or past[-1].get("step") != snap.get("step"):
            past.append(snap)
        alerts = list(snap.get("alerts") or [])
        for scope, name, values in _rows(snap):
            group = "streams" if scope == "stream" else "layers"
            mine = [i for i, a in enumerate(alerts)
                    if a.get("stream") == name and a.get("scope", "stream") == scope]
            series = [((h.get(group) or {}).get(name) or {}).get(RANK) for h in past]
            table.add_row(
                *([Text(run)] if many else []),
                Text(shown(name) if scope == "stream" else f"{shown(name)} (layer)"),
                Text(shown(snap.get("step", "–"))),
                fmt_rank(values.get(RANK)), sparkline(series, width),
                fmt_ratio(values.get(STD_RATIO)), fmt_ratio(values.get(dormant_key)),
                fmt_ratio(values.get(LOW_QUALITY)),
                Text(", ".join(shown(short_alert(alerts[i]["name"])) for i in mine),
                     style="bold red")
                if mine else Text("ok", style="green"))
        counters = snap.get("counters") or {}
        samples = sum(_finite((c or {}).get("samples")) or 0.0 for c in counters.values())
        dropped, errors = _total(snap.get("dropped")), _total(snap.get("errors"))
        scored = f"samples scored {_count(samples)} · " if counters else ""
        line = Text(f"{run}: {scored}dropped {_count(dropped)} · errors {_count(errors)}")
        if errors:
            line.append(" (" + ", ".join(f"{shown(k)} {shown(v)}" for k, v in sorted(
                (snap.get("errors") or {}).items())) + ")", style="red")
        caption.append(line)
        for a in alerts:
            scope = a.get("scope", "stream")
            where = shown(a.get("stream", "") if scope == "stream"
                          else f"{scope} {a.get('stream', '')}")
            caption.append(Text(f"  firing: {shown(a.get('name'))} on {where} since step "
                                f"{shown(a.get('since_step', '?'))} ({shown(a.get('signal', '?'))} "
                                f"{fmt_ratio(a.get('value'))})",
                                style="bold red" if a.get("severity") == "critical" else "red"))
    if not status:
        caption.append(Text("no run has published yet"))
    if note:
        caption.append(Text(note, style="yellow"))
    table.caption = Text("\n").join(caption)
    return table


class SnapshotView:
    """The table fed in process: keeps the last ``limit`` snapshot dicts of each run."""

    def __init__(self, limit: int = HISTORY_LIMIT, width: int = SPARK_WIDTH,
                 title: str | None = "repwatch") -> None:
        self.width, self.title = width, title
        self._history: dict[str, deque[Snap]] = {}
        self._limit = limit

    def add(self, snap: Snap) -> None:
        """Record a snapshot dict (``Snapshot.to_dict()``)."""
        run = str(snap.get("run", ""))
        self._history.setdefault(run, deque(maxlen=self._limit)).append(snap)

    def table(self, note: str | None = None) -> Table:
        """The table over the latest snapshot of every run seen."""
        status = [h[-1] for h in self._history.values() if h]
        return build_table(status, {r: list(h) for r, h in self._history.items()},
                           width=self.width, title=self.title, note=note)


@contextlib.contextmanager
def live(console: Console, first: Table | None = None) -> Iterator[Live]:
    """A :class:`rich.live.Live` on ``console`` whose log records print above the table (the
    stream handlers of the root logger write through it while it runs); long lines of the
    table wrap while it is on screen (``console.soft_wrap`` off)."""
    soft_wrap, console.soft_wrap = console.soft_wrap, False
    handlers = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
    old: list[Any] = []
    try:
        with Live(first if first is not None else Text(""), console=console,
                  refresh_per_second=4, auto_refresh=True) as lv:
            old = [h.setStream(sys.stderr) for h in handlers]  # Live's proxy while it runs
            yield lv
    finally:
        for h, stream in zip(handlers, old):
            if stream is not None:
                h.setStream(stream)
        console.soft_wrap = soft_wrap


class WatchError(Exception):
    """The server could not be read (unreachable, HTTP error, not JSON, not repwatch's)."""


def _json_type(value: object) -> str:
    """The JSON type of ``value`` with an article, for error messages."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


_GROUPS = ("streams", "layers", "counters")
"""Snapshot keys whose values map a name to a dict of values (or None)."""


def snapshot_problem(snap: object) -> str | None:
    """Why ``snap``, as a server sent it, is not a snapshot dict that :func:`build_table` can
    show (a field of the wrong type), or None. Values of odd types are shown as text or ``–``;
    only the shapes the table walks are checked: a server's answer is not trusted."""
    if not isinstance(snap, dict):
        return f"a snapshot that is {_json_type(snap)}, not an object"
    if not isinstance(snap.get("run"), str):
        return f"a snapshot whose run name is {_json_type(snap.get('run'))}, not a string"
    for key in (*_GROUPS, "dropped", "errors"):
        if not isinstance(snap.get(key) or {}, dict):
            return f"a snapshot whose {key} is {_json_type(snap.get(key))}, not an object"
    for key in _GROUPS:
        if not all(v is None or isinstance(v, dict) for v in (snap.get(key) or {}).values()):
            return f"a snapshot with an entry of {key} that is not an object"
    alerts = snap.get("alerts") or []
    if not isinstance(alerts, list) or not all(
            isinstance(a, dict) and isinstance(a.get("name"), str) for a in alerts):
        return "a snapshot whose alerts are not a list of named alerts"
    return None


def path_segment(name: str) -> str:
    """``name`` as one URL path segment: every character but letters, digits and ``_.-~``
    percent-encoded (``/``, ``?``, ``#``, control characters), and a ``.``/``..`` segment too (a
    client would normalise it away)."""
    quoted = quote(name, safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


def fetch(url: str, run: str | None = None, *, token: str | None = None,
          limit: int = HISTORY_LIMIT, client: Any = None,
          timeout: float = 5.0) -> tuple[list[Snap], dict[str, list[Snap]]]:
    """``(status, histories)`` of the runs at repwatch server ``url`` (only ``run`` if given):
    ``/v1/runs`` then ``/v1/runs/{run}/history?limit=``; :class:`WatchError` when it fails."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    own = client is None
    cl = httpx.Client(timeout=timeout, headers=headers) if own else client

    def get(path: str, params: dict[str, Any] | None = None) -> Any:
        try:
            resp = cl.get(url + path, params=params)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise WatchError(f"cannot reach {url + path}: {exc or type(exc).__name__}") from None
        if resp.status_code == 404 and params is not None:
            return []
        if resp.status_code != 200:
            raise WatchError(f"{url + path} answered HTTP {resp.status_code}")
        try:
            return resp.json()
        except (ValueError, RecursionError):           # RecursionError: nested too deep
            raise WatchError(f"{url + path} did not answer JSON (is it a repwatch server?): "
                             f"{resp.text[:60]!r}") from None

    try:
        runs = get("/v1/runs")
        if not isinstance(runs, list):
            raise WatchError(f"{url}/v1/runs did not answer a list of runs "
                             f"(is it a repwatch server?)")
        for r in runs:
            if (problem := snapshot_problem(r)) is not None:
                raise WatchError(f"{url}/v1/runs answered {problem} (is it a repwatch server?)")
        if run is not None:
            runs = [r for r in runs if r["run"] == run]
        histories = {}
        for r in runs:        # a malformed snapshot of a history only loses its sparkline point
            hist = get(f"/v1/runs/{path_segment(r['run'])}/history", {"limit": limit})
            histories[r["run"]] = [h for h in hist if snapshot_problem(h) is None] \
                if isinstance(hist, list) else []
        return runs, histories
    finally:
        if own:
            cl.close()


PIPE_WIDTH = 1000
"""Console width when stdout is not a terminal (a pipe, a file, CI logs): wide enough that no
cell of the table is folded (``strea`` / ``m``); a table is only as wide as its content."""


def plain_console() -> Console:
    """The console of ``repwatch watch``: the terminal's width on a terminal; elsewhere
    :data:`PIPE_WIDTH` columns, whatever ``$COLUMNS`` says, so that piped output is not wrapped
    at 80 columns."""
    if sys.stdout.isatty():
        return Console(highlight=False)
    return Console(highlight=False, width=PIPE_WIDTH)


def print_unwrapped(console: Console, table: Table) -> None:
    """Print ``table`` for a pipe or a file: title and caption lines on lines of their own
    (``soft_wrap``: never broken at the table's width), the rows at their natural width."""
    title, caption = table.title, table.caption
    table.title = table.caption = None
    try:
        if title is not None:
            console.print(title, soft_wrap=True)
        console.print(table)
        if caption is not None:
            console.print(caption, soft_wrap=True)
    finally:
        table.title, table.caption = title, caption


def normalise_url(url: str) -> str:
    """``host:port`` → ``http://host:port``; no trailing slash."""
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def watch(url: str, *, run: str | None = None, interval: float = 2.0, once: bool = False,
          token: str | None = None, console: Console | None = None,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """``repwatch watch``: poll ``url`` and show the table; 0 on Ctrl-C or after ``once``,
    2 with one line on stderr when the first poll fails (or ``once`` finds no ``run``)."""
    import httpx

    url = normalise_url(url)
    console = console or plain_console()
    with httpx.Client(timeout=max(2.0, interval), headers=(
            {"Authorization": f"Bearer {token}"} if token else {})) as client:
        try:
            status, hist = fetch(url, run, client=client)
        except WatchError as exc:                      # shown(): one line, no escapes
            print(f"repwatch watch: error: {shown(exc)}", file=sys.stderr)
            return 2
        title = f"repwatch · {shown(url)}"

        def frame(note: str | None = None) -> Table:
            return build_table(status, hist, title=title, note=note,
                               width=spark_width(console.width))

        if once:
            if run is not None and not status:
                print(f"repwatch watch: error: no run {run!r} at {url}", file=sys.stderr)
                return 2
            if console.is_terminal:
                console.print(frame())
            else:                                        # a pipe or a file: never wrapped
                print_unwrapped(console, frame())
            return 0
        try:
            with live(console, frame()) as lv:
                while True:
                    sleep(interval)
                    try:
                        status, hist = fetch(url, run, client=client)
                        note = None
                    except WatchError as exc:
                        note = f"{shown(exc)}; retrying every {interval:g} s"
                    lv.update(frame(note))
        except KeyboardInterrupt:
            return 0

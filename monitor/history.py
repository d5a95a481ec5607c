"""Read back a run's history: the JSONL log that ``Monitor(log_path=...)`` writes.

A Monitor given ``log_path`` (:class:`~monitor.config.MonitorConfig`; the Lightning and
Hugging Face callbacks pass it through) appends one line per publish to that file: the
publish's :meth:`Snapshot.to_dict() <monitor.snapshot.Snapshot.to_dict>` as JSON (signal
values that are NaN or ±Inf written as ``null``; no eigenvalue spectra), alerts included, and
it keeps appending across restarts of the process (the file is opened per write, never
truncated or rotated). This module reads it (torch-free)::

    from monitor import history

    snaps = history.read("run.jsonl")            # list[Snapshot], in the order written
    snaps[-1].get("effective_rank", stream="projector")
    df = history.to_frame(snaps)                 # pandas, long format (below)
    for ep in history.alert_episodes(snaps):     # which alerts fired, from when to when
        print(ep.alert.name, ep.alert.stream, ep.first_step, ep.resolved_step)

and ``repwatch report RUN.jsonl [OTHER.jsonl ...] -o report.html`` (:mod:`monitor.cli.report`)
turns one or more logs into an offline HTML page.

* :func:`read` parses every line with :meth:`Snapshot.from_dict`. A log being written (or
  left by a crash mid-write) may end in a partial line: a last line without its newline that is
  not valid JSON is skipped (``read(..., on_truncated="raise")`` to refuse it). Any other bad
  line raises :class:`HistoryError` naming the file and the line number; pass
  ``skip_malformed=True`` to skip such lines with a warning instead (a crash mid-write followed
  by a restart that appended to the same file leaves one in the middle). Blank lines are
  skipped.
* :func:`timeline` keeps, per run, the branch the run ended on: when a run was resumed from an
  earlier checkpoint, its log still holds the steps of the abandoned branch (the live history
  drops them); ``timeline`` drops them too, so steps increase.
* :func:`by_run` splits a log that holds several runs (several Monitors with one ``log_path``,
  or ``per_rank=True`` ranks) by ``(run, rank)``.
* :func:`to_frame` is a **long** ("tidy") pandas DataFrame: one row per snapshot × scope ×
  entity × signal, columns ``run`` (str), ``rank`` (nullable Int64: None unless
  ``per_rank=True``), ``step`` (int64), ``time`` (float64, Unix seconds), ``scope``
  (``stream``, ``layer``, ``param`` or ``run``), ``entity`` (the stream, layer or parameter
  name; ``model`` for run-level signals), ``signal`` (the key as written, labels included:
  ``dormant_units_ratio{tau=0.1}``) and ``value`` (float64, NaN where the log has null).
  Streams' counters (``samples``, ``nonfinite_values``) are rows of scope ``stream``, as
  :meth:`Snapshot.get` sees them. Long rather than one row per snapshot × stream because
  layers, parameters and streams carry different signals and labelled keys; one signal over
  steps is ``df[(df.entity == "projector") & (df.signal == "effective_rank")]``, and a wide
  table per entity is ``df.pivot_table(index=["run", "step"], columns=["entity", "signal"],
  values="value")``. pandas is not a dependency of repwatch: :func:`to_frame` raises
  ImportError saying so when it is missing (``pip install pandas``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from monitor.snapshot import SCOPES, Alert, Snapshot

if TYPE_CHECKING:
    import pandas

log = logging.getLogger("repwatch")

__all__ = ["AlertEpisode", "HistoryError", "alert_episodes", "by_run", "read", "timeline",
           "to_frame"]

FRAME_COLUMNS: tuple[str, ...] = ("run", "rank", "step", "time", "scope", "entity", "signal",
                                  "value")
"""The columns of :func:`to_frame`, in order."""


class HistoryError(ValueError):
    """A line of a history log that is not a snapshot (``path``, 1-based ``line``)."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: not a repwatch snapshot line: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


def read(path: str | os.PathLike[str], *, skip_malformed: bool = False,
         on_truncated: Literal["skip", "raise"] = "skip") -> list[Snapshot]:
    """The snapshots of the JSONL log at ``path``, in the order they were written.

    A last line without a trailing newline that does not parse is a write in progress (or cut
    by a crash) and is skipped with a debug log (``on_truncated="raise"``: HistoryError); a
    complete last line without the newline is read. Every other line that is not a snapshot
    raises :class:`HistoryError` with the line number, or, with ``skip_malformed=True``, is
    skipped with a warning. OSError (missing file, ...) passes through.
    """
    name = os.fspath(path)
    out: list[Snapshot] = []
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh):
            if raw.strip():
                snap = _parse(raw, name, i, skip_malformed, on_truncated)
                if snap is not None:
                    out.append(snap)
    return out


def _parse(raw: bytes, name: str, i: int, skip_malformed: bool, on_truncated: str
           ) -> Snapshot | None:
    """The snapshot on line ``i`` (0-based) of ``name``; None: skipped."""
    try:
        return Snapshot.from_dict(json.loads(raw.decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as exc:
        # only the last line can lack its newline: a write in progress, or cut by a crash
        if not raw.endswith(b"\n") and on_truncated == "skip" and _is_cut_json(exc):
            log.debug("%s:%d: skipped the unterminated last line (a write in progress?)",
                      name, i + 1)
            return None
        err = HistoryError(name, i + 1, _reason(exc))
        if skip_malformed:
            log.warning("%s (skipped)", err)
            return None
        raise err from exc


def _is_cut_json(exc: Exception) -> bool:
    """True for a parse error a cut-off write produces (JSON or UTF-8 ending early)."""
    return isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError))


def _reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON ({exc.msg} at column {exc.colno})"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 ({exc.reason} at byte {exc.start})"
    return str(exc)


def by_run(snapshots: Iterable[Snapshot]) -> dict[tuple[str, int | None], list[Snapshot]]:
    """The snapshots grouped by ``(run, rank)`` (rank None unless ``per_rank=True``), in
    order of first appearance, each group in the order written."""
    groups: dict[tuple[str, int | None], list[Snapshot]] = {}
    for snap in snapshots:
        groups.setdefault((snap.run, snap.rank), []).append(snap)
    return groups


def timeline(snapshots: Iterable[Snapshot]) -> list[Snapshot]:
    """The snapshots of the branch each run ended on, in the order written: a snapshot at a
    step at or before the previous snapshot of its ``(run, rank)`` (a resume from an earlier
    checkpoint, or a second publish at one step) replaces that run's snapshots from its step
    on. Steps then increase within each run."""
    kept: dict[tuple[str, int | None], list[Snapshot]] = {}
    order: list[Snapshot] = []
    for snap in snapshots:
        branch = kept.setdefault((snap.run, snap.rank), [])
        while branch and branch[-1].step >= snap.step:
            branch.pop()
        branch.append(snap)
        order.append(snap)
    alive = {id(s) for branch in kept.values() for s in branch}
    return [s for s in order if id(s) in alive]


@dataclass(frozen=True)
class AlertEpisode:
    """One alert from the publish where it first fires to the one where it no longer does.

    ``alert``: the alert as of its last firing publish; ``first_step``/``last_step``: the steps
    of the first and last publish that carry it; ``resolved_step``: the step of the first
    publish without it, None when it still fires at the end of the history.
    """

    alert: Alert
    first_step: int
    last_step: int
    resolved_step: int | None

    @property
    def key(self) -> tuple[str, str, str, int]:
        """``(name, scope, stream, since_step)``: what tells one episode from another."""
        a = self.alert
        return (a.name, a.scope, a.stream, a.since_step)


def alert_episodes(snapshots: Sequence[Snapshot]) -> list[AlertEpisode]:
    """The alert episodes of one run's snapshots (use :func:`timeline` first for a log with
    resumes, :func:`by_run` for one with several runs), in order of first firing."""
    open_: dict[tuple[str, str, str, int], AlertEpisode] = {}
    done: list[AlertEpisode] = []
    for snap in snapshots:
        now = {(a.name, a.scope, a.stream, a.since_step): a for a in snap.alerts}
        for key in list(open_):
            if key not in now:
                ep = open_.pop(key)
                done.append(AlertEpisode(ep.alert, ep.first_step, ep.last_step, snap.step))
        for key, a in now.items():
            ep = open_.get(key)
            open_[key] = AlertEpisode(a, ep.first_step if ep else snap.step, snap.step, None)
    return sorted([*done, *open_.values()], key=lambda e: (e.first_step, e.key))


def _rows(snapshots: Iterable[Snapshot]) -> Iterable[tuple[object, ...]]:
    for snap in snapshots:
        head = (snap.run, snap.rank, snap.step, snap.time)
        for scope in SCOPES:
            for entity, values in snap.group(scope).items():
                extra = snap.counters.get(entity, {}) if scope == "stream" else {}
                for key, v in (*values.items(), *extra.items()):
                    yield (*head, scope, entity, str(key), v)


def to_frame(snapshots: Iterable[Snapshot]) -> pandas.DataFrame:
    """The snapshots as a long pandas DataFrame (columns :data:`FRAME_COLUMNS`; see the
    module's docstring). Raises ImportError when pandas is not installed."""
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError("monitor.history.to_frame needs pandas, which repwatch does not "
                          "install: pip install pandas (read() and the snapshots need "
                          "nothing else)") from exc
    df = pd.DataFrame.from_records(list(_rows(snapshots)), columns=list(FRAME_COLUMNS))
    return df.astype({"run": object, "rank": "Int64", "step": "int64", "time": "float64",
                      "scope": object, "entity": object, "signal": object,
                      "value": "float64"})

"""``repwatch select``: rank trained models / checkpoints without labels.

Inputs (one per model):

* **embedding dumps** — ``.pt``/``.pth`` holding one ``(n, d)`` tensor, or ``.npy`` holding
  one ``(n, d)`` array: a model's representations of a probe set. For centrality every dump
  must cover the *same* probe inputs in the same order.
* **saved monitor states** — ``torch.save(monitor.state_dict(), path)``: the rows still in
  one stream's scoring window (``engine.streams[stream].moments.ring`` where ``ring_valid``
  is 1). Those rows are whatever the run saw last, not a shared probe, so only RankMe ranks
  them.
* **checkpoints holding a monitor state** — any dict saved with ``torch.save`` in which a
  Monitor state sits under some key, at any depth: the README's
  ``{"model": model.state_dict(), "repwatch": mon.state_dict()}``, a Lightning ``.ckpt``
  (``callbacks/RepwatchCallback[run=...]/monitor``). A Monitor state is a dict with
  ``version`` 1 and ``engine``; when a file holds several, ``key=`` (``--key``, the
  ``/``-joined keys leading to it) picks one.

Criteria: ``rankme`` — RankMe of the rows (Garrido et al., ICML 2023; higher is better;
compare at equal n and d), and ``centrality`` — mean linear CKA to the other models
(ModelCentrality-style, Lin et al., ICML 2020, with CKA in place of the paper's FactorVAE
similarity; see :mod:`monitor.functional.selection`). With several criteria, models are
ordered by the mean of their per-criterion ranks (ties: the first criterion).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from monitor.functional.selection import centrality_ranking, rankme_ranking
from monitor.cli.select import add_parser  # noqa: F401 - re-exported (the parser is torch-free)

CRITERIA: tuple[str, ...] = ("rankme", "centrality")


@dataclass
class Representation:
    """Rows of one model read from a file, and where they came from."""

    name: str
    path: str
    source: str            # "dump" or "monitor"
    rows: Tensor           # (n, d) float64, CPU
    stream: str | None = None
    step: int | None = None
    key: str | None = None  # where the Monitor state sat in a checkpoint ("" at top level)


def _rows_from_array(value: Any, path: Path) -> Tensor:
    t = torch.as_tensor(value)
    if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"{path}: expected an (n, d) embedding matrix, got shape {tuple(t.shape)}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{path}: expected numeric embeddings, got dtype {t.dtype}")
    t = t.to(torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{path}: embeddings contain NaN or Inf values")
    return t


def _rows_from_monitor_state(state: dict[str, Any], path: Path,
                             stream: str | None) -> tuple[Tensor, str, int | None]:
    try:
        streams = state["engine"]["streams"]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: a repwatch Monitor state without engine streams") from None
    if not streams:
        raise ValueError(f"{path}: the monitor state has no streams (nothing was observed)")
    if stream is None:
        if len(streams) != 1:
            raise ValueError(f"{path}: the monitor state has streams {sorted(streams)}; "
                             "choose one with --stream")
        stream = next(iter(streams))
    if stream not in streams:
        raise ValueError(f"{path}: no stream {stream!r} in the monitor state; it has {sorted(streams)}")
    moments = streams[stream]["moments"]
    if "ring" not in moments:
        raise ValueError(f"{path}: a compact Monitor state (state_dict(compact=True)) keeps no "
                         "rows; repwatch select needs a full state_dict()")
    ring = torch.as_tensor(moments["ring"]).to(torch.float64)           # (window, d)
    valid = torch.as_tensor(moments["ring_valid"]) > 0                  # (window,)
    rows = ring[valid]                                                  # offline: host indexing is fine
    if rows.shape[0] < 2:
        raise ValueError(f"{path}: stream {stream!r} holds {rows.shape[0]} valid row(s); need >= 2")
    step = state.get("step")
    return rows, stream, int(step) if isinstance(step, int) else None


def is_monitor_state(obj: Any) -> bool:
    """A :meth:`monitor.Monitor.state_dict` (version 1, with ``engine``)."""
    return isinstance(obj, dict) and obj.get("version") == 1 and "engine" in obj


KEY_SEP = "/"
"""Joins the keys leading to a Monitor state inside a checkpoint (``callbacks/X/monitor``)."""

_MAX_DEPTH = 8


def find_monitor_states(obj: Any, _path: tuple[str, ...] = (),
                        _depth: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """``(key path, state)`` of every Monitor state in ``obj``: ``obj`` itself (path ``""``) or
    any value of nested dicts (and lists/tuples, by index), at most 8 levels deep; paths join
    the keys with ``/``. A Monitor state is not searched further."""
    if is_monitor_state(obj):
        return [(KEY_SEP.join(_path), obj)]
    if _depth >= _MAX_DEPTH:
        return []
    items: Any
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return []
    found: list[tuple[str, dict[str, Any]]] = []
    for k, v in items:
        if isinstance(v, (dict, list, tuple)):
            found += find_monitor_states(v, (*_path, str(k)), _depth + 1)
    return found


def _pick_state(obj: Any, path: Path, key: str | None) -> tuple[str, dict[str, Any]] | None:
    """The Monitor state of a loaded file: the one at ``key`` (a ``/``-joined key path) or the
    only one; None when the file holds none and no ``key`` was asked for."""
    found = find_monitor_states(obj)
    listed = ", ".join(repr(w) for w, _ in found) or "none"
    if key is not None:
        norm = key.strip(KEY_SEP)
        for where, state in found:
            if where == norm:
                return where, state
        value: Any = obj
        for part in norm.split(KEY_SEP) if norm else []:
            if not isinstance(value, dict) or part not in value:
                raise ValueError(f"{path}: no key {key!r} in this file; repwatch Monitor "
                                 f"states in it: {listed}")
            value = value[part]
        raise ValueError(f"{path}: the value at key {key!r} is a {type(value).__name__}, not "
                         f"a repwatch Monitor state_dict (a dict with version 1 and "
                         f"'engine'); Monitor states in this file: {listed}")
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"{path}: holds {len(found)} repwatch Monitor states, at keys "
                         f"{listed}; choose one with --key")
    return found[0]


def load_representation(path: str | Path, stream: str | None = None,
                        key: str | None = None) -> Representation:
    """Read one input file (embedding dump, saved Monitor state, or a checkpoint dict holding a
    Monitor state under some key) into rows. ``key``: the ``/``-joined keys of the Monitor
    state inside a checkpoint that holds several (see :func:`find_monitor_states`)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"{p}: not a plain numeric .npy array ({exc})") from None
        return Representation(p.stem, str(p), "dump", _rows_from_array(arr, p))
    if suffix not in (".pt", ".pth", ".ckpt"):
        raise ValueError(f"{p}: expected a .pt/.pth/.ckpt (tensor, Monitor state or a "
                         f"checkpoint holding one) or .npy file, "
                         f"got {suffix or 'no suffix'!r}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{p}: cannot read it as a torch file of tensors/plain data "
                         f"({type(exc).__name__}: {exc})") from None
    if isinstance(obj, Tensor) and key is None:
        return Representation(p.stem, str(p), "dump", _rows_from_array(obj, p))
    picked = _pick_state(obj, p, key)
    if picked is not None:
        where, state = picked
        rows, name, step = _rows_from_monitor_state(state, p, stream)
        return Representation(p.stem, str(p), "monitor", rows, stream=name, step=step,
                              key=where)
    extra = (f" (keys: {', '.join(repr(str(k)) for k in list(obj)[:10])}"
             f"{', ...' if len(obj) > 10 else ''})" if isinstance(obj, dict) else "")
    raise ValueError(f"{p}: expected an (n, d) tensor, a repwatch Monitor state_dict, or a "
                     f"checkpoint dict holding one under some key; got a "
                     f"{type(obj).__name__} without a Monitor state{extra}")


def _criteria(by: str | Sequence[str]) -> tuple[str, ...]:
    items = CRITERIA if by == "both" else (by,) if isinstance(by, str) else tuple(by)
    bad = [c for c in items if c not in CRITERIA]
    if not items or bad:
        raise ValueError(f"by must be 'rankme', 'centrality', 'both' or a sequence of them, got {by!r}")
    return tuple(dict.fromkeys(items))


def select(paths: Sequence[str | Path], probe: int | None = None,
           by: str | Sequence[str] = CRITERIA, stream: str | None = None,
           key: str | None = None) -> list[dict[str, Any]]:
    """Rank the models in ``paths``; best first.

    Args:
        paths: embedding dumps (``.pt`` tensor / ``.npy`` array, ``(n, d)``) or saved Monitor
            states (``.pt``).
        probe: use only the first ``probe`` rows of every input (equal n for RankMe; the
            shared probe batch for centrality). None: all rows.
        by: ``"rankme"``, ``"centrality"``, ``"both"`` or a sequence of them. Centrality needs
            >= 2 dumps with equal n; when it is not the only criterion and cannot be computed
            (monitor states, unequal n, one model), its column is None.
        stream: the stream to read from Monitor states (needed when a state has several).
        key: where the Monitor state sits in checkpoints that hold several (``/``-joined
            keys, e.g. ``repwatch`` or ``callbacks/RepwatchCallback[run=exp1]/monitor``).

    Returns one dict per model: ``rank`` (1 = best), ``name``, ``path``, ``source``, ``stream``,
    ``n``, ``d``, ``rankme``, ``centrality`` (None when not computed), plus ``rankme_rank`` /
    ``centrality_rank`` for the computed criteria.
    """
    crit = _criteria(by)
    if isinstance(paths, (str, Path)) or len(paths) == 0:
        raise ValueError(f"paths must be a non-empty sequence of files, got {paths!r}")
    if probe is not None and (isinstance(probe, bool) or not isinstance(probe, int) or probe < 2):
        raise ValueError(f"probe must be an int >= 2 (rows per input) or None, got {probe!r}")
    reps = [load_representation(p, stream, key) for p in paths]
    names = [r.name for r in reps]
    if len(set(names)) != len(names):                       # same stem in two folders
        names = [r.path for r in reps]
        if len(set(names)) != len(names):
            raise ValueError(f"the same file is given twice: {sorted(names)}")
    rows: dict[str, Tensor] = {}
    for name, rep in zip(names, reps):
        if probe is not None:
            if rep.rows.shape[0] < probe:
                raise ValueError(f"{rep.path}: {rep.rows.shape[0]} rows, fewer than probe={probe}")
            rows[name] = rep.rows[:probe]
        else:
            rows[name] = rep.rows
    scores: dict[str, dict[str, float]] = {}
    if "rankme" in crit:
        scores["rankme"] = dict(rankme_ranking(rows))
    if "centrality" in crit:
        why = None
        if any(r.source != "dump" for r in reps):
            why = "centrality needs embedding dumps of one shared probe batch, not monitor states"
        elif len(reps) < 2:
            why = "centrality needs at least 2 models"
        elif len({t.shape[0] for t in rows.values()}) != 1:
            why = ("centrality needs every dump over the same probe inputs; row counts differ "
                   f"({', '.join(f'{k}: {v.shape[0]}' for k, v in rows.items())}); use probe=")
        if why is not None and crit == ("centrality",):
            raise ValueError(why)
        if why is None:
            scores["centrality"] = dict(centrality_ranking(rows))
    ranks: dict[str, dict[str, int]] = {}
    for c, values in scores.items():
        order = sorted(values, key=lambda k: (math.isnan(values[k]),
                                              -values[k] if not math.isnan(values[k]) else 0.0))
        ranks[c] = {k: i + 1 for i, k in enumerate(order)}
    used = [c for c in crit if c in ranks]

    def order(name: str) -> tuple[float, int]:
        return (sum(ranks[c][name] for c in used) / len(used), ranks[used[0]][name])

    out: list[dict[str, Any]] = []
    for i, name in enumerate(sorted(names, key=order), 1):
        rep = reps[names.index(name)]
        row: dict[str, Any] = {
            "rank": i, "name": name, "path": rep.path, "source": rep.source,
            "stream": rep.stream, "n": int(rows[name].shape[0]), "d": int(rows[name].shape[1]),
            "rankme": scores.get("rankme", {}).get(name),
            "centrality": scores.get("centrality", {}).get(name),
        }
        for c in used:
            row[f"{c}_rank"] = ranks[c][name]
        out.append(row)
    return out


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A ranked plain-text table of :func:`select` rows (+ a note when n or d differ)."""
    if not rows:
        return "(no models)"
    cols = [("rank", "#"), ("name", "model"), ("source", "source"), ("n", "n"), ("d", "d"),
            ("rankme", "RankMe"), ("centrality", "centrality (CKA)")]
    if any(r.get("stream") for r in rows):
        cols.insert(3, ("stream", "stream"))
    cells = [[h for _, h in cols]] + [[_fmt(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    numeric = {"rank", "n", "d", "rankme", "centrality"}

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if k in numeric else c.ljust(w)
                         for c, w, (k, _) in zip(row, widths, cols)).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]
    if len({(r["n"], r["d"]) for r in rows}) > 1:
        out.append("note: n or d differ between models; RankMe is only comparable at equal n "
                   "and d (use --probe-rows for equal n).")
    if all(r.get("centrality") is None for r in rows) and any(r.get("rankme_rank") for r in rows):
        if any(r["source"] != "dump" for r in rows) or len(rows) < 2:
            out.append("note: centrality not computed (needs >= 2 embedding dumps of one probe batch).")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    """Run ``repwatch select``; 0 on success, 2 on bad input (message on stderr)."""
    try:
        rows = select(args.paths, probe=args.probe_rows, by=args.by, stream=args.stream,
                      key=getattr(args, "key", None))
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"repwatch select: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                  for k, v in r.items()} for r in rows]
        print(json.dumps(clean, indent=2))
    else:
        print(format_table(rows))
    return 0

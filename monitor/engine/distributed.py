"""Exact global metrics across ``torch.distributed`` ranks, reduced once per publish.

Per-rank RankMe on a small local batch is biased and averaging per-rank values is wrong
(docs/metrics.md §1, pitfall 1 and "Streaming"). Every scorer therefore declares how its state
combines across ranks (:meth:`monitor.scorers.state.Scorer.add_state`), and at each publish
:class:`GlobalReducer` combines the *sufficient statistics* of every stream and layer, so the
published values equal what one process computes on all ranks' rows concatenated:

==========================  ======================================================  ==========
state                       global version                                          collective
==========================  ======================================================  ==========
``reduce="sum"``            sum (``S = ΣZᵀZ``, ``Σz``, ``Σẑ``, ``Σẑ²``, n,          all_reduce
                            Q-Score histogram, dormancy sums, counters)
``reduce="max"/"min"``      max / min (``ever_active``)                             all_gather
WindowMoments ring          not sent: the sums above are its statistics; the         all_reduce
                            Q-Score's negative share sends (negatives, entries)
NeuralCollapse ring         not sent: its ``(S, class sums, counts)`` are summed     all_reduce
Q-Score rings (1-D)         concatenated: the global window is the union of          all_gather
                            ranks' windows (``world × window`` scores, bounded)
Q-Score threshold           the calibrated value, fixed on every rank at the same    all_gather
                            publish from the same gathered window
==========================  ======================================================  ==========

So a publish costs three collectives whatever the number of streams: one small
``all_gather_object`` of each rank's manifest (stream names, dimensions, host counters), ONE
``all_reduce(SUM)`` of a single float64 buffer holding every sum state (O(d²) per stream), and
ONE ``all_gather`` of a float64 buffer holding the max/min states and the 1-D Q-Score rings.

Rules that keep ranks in step:

* Every rank must publish at the same steps (the cadence is by step count) with the same
  Monitor options (window, Q-Score options, ``max_classes``). Streams and layers are matched by
  name; one known to some ranks only is created empty on the others, which contribute zeros
  (neutral values). A name whose dimension differs between ranks is not reduced: each rank
  publishes its local values for it and counts a ``distributed`` error.
* All local work (settling windows, packing states) runs in ``try/except``; a rank whose part
  fails contributes neutral values for that part and counts the error, but always joins the
  collectives. Nothing after the collectives communicates, so a scorer that raises while
  computing the published values (on the reduced copies) cannot hang another rank. The buffer
  layout is derived from the merged manifest and the shared options only (the same on every
  rank); a failure there that hits one rank only (out of memory building the small shape
  prototypes) is the one local failure that can still break the collectives.
* The reduction works on temporary copies: each rank's state stays local, so the next publish
  does not count anything twice. Only the Q-Score calibration (a global decision) is written
  back to the local scorer.

Not reduced (rank-local, documented in the README): ``neural_collapse_nc4`` (the NCC rule needs
rows: each rank reports it on its own window against the *global* class means), the GAN pair
reservoirs (``pair()``), weights (identical under DDP) and the curvature probe.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from monitor.engine.engine import Engine, Layer, Stream
from monitor.engine.window import RingCursor
from monitor.errors import ErrorLog
from monitor.scorers.state import Scorer
from monitor.snapshot import Readings

Kind = Literal["sum", "max", "min", "cat"]
_NEUTRAL: dict[str, float] = {"sum": 0.0, "max": -math.inf, "min": math.inf, "cat": math.nan}


def world() -> tuple[int, int] | None:
    """``(rank, world_size)`` when torch.distributed is initialised with more than one rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    size = dist.get_world_size()
    return (dist.get_rank(), size) if size > 1 else None


def serving_port(port: int | None, per_rank: bool) -> int | None:
    """The port this process serves on: ``port`` on local rank 0 (per rank: ``port`` + local
    rank on every rank; 0 stays "any free port"), None when it does not serve."""
    here = local_rank()
    if port is None or not (per_rank or here == 0):
        return None
    if per_rank and port != 0:
        port += here
        if port > 65535:
            raise ValueError(f"port + local rank ({port}) must be at most 65535")
    return port


def ranks_publish_together() -> bool:
    """True in an initialised process group of more than one rank (a global reduction)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def local_rank() -> int:
    """This process's rank on its node: ``LOCAL_RANK``, else ``rank % LOCAL_WORLD_SIZE``, else
    the global rank (so that without either variable only global rank 0 counts as local 0)."""
    env = os.environ.get("LOCAL_RANK", "")
    if env.strip():
        return int(env)
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        lws = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
        return rank % int(lws) if lws else rank
    return 0


def global_rank() -> int | None:
    """The global rank (``RANK`` or torch.distributed), None when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    env = os.environ.get("RANK", "").strip()
    return int(env) if env else None


# ------------------------------------------------------------------ wrapper prefixes

_WRAPPED_ATTR: dict[str, str] = {
    "DistributedDataParallel": "module", "DataParallel": "module",
    "FullyShardedDataParallel": "_fsdp_wrapped_module", "OptimizedModule": "_orig_mod",
    "CheckpointWrapper": "_checkpoint_wrapped_module", "OffloadWrapper": "_checkpoint_wrapped_module",
}
"""Wrapper class name → the attribute holding the wrapped module (DDP, FSDP, torch.compile,
activation checkpointing)."""


def unwrap(module: nn.Module) -> nn.Module:
    """The innermost module under DDP / FSDP / ``torch.compile`` / checkpoint wrappers."""
    while True:
        attr = _WRAPPED_ATTR.get(type(module).__name__)
        inner = getattr(module, attr, None) if attr else None
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def type_name(module: nn.Module) -> str:
    """The class name of the model under its wrappers: ``DDP(model)`` → the model's class, and
    FSDP2's ``fully_shard`` (which swaps the class for a generated ``FSDP<Class>``) → ``Class``."""
    cls = type(unwrap(module))
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:                           # older torch, or no distributed support
        return cls.__name__
    if issubclass(cls, FSDPModule):
        cls = next((c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule)), cls)
    return cls.__name__


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` without the wrapper segments (``module.``,
    ``_fsdp_wrapped_module.``, ``_orig_mod.``, ``_checkpoint_wrapped_module.``) — only where the
    parent really is such a wrapper. A wrapper and the module it wraps share one name, which
    goes to the wrapped module (the one whose type and hooks matter); shared modules once."""
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def join(prefix: str, name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    def walk(prefix: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        attr = _WRAPPED_ATTR.get(type(module).__name__)
        inner = getattr(module, attr, None) if attr else None
        if isinstance(inner, nn.Module):         # a wrapper: the wrapped module takes its name
            walk(prefix, inner)
            for name, child in module.named_children():
                if child is not None and child is not inner:
                    walk(join(prefix, name), child)
            return
        if prefix:
            out.append((prefix, module))
        for name, child in module.named_children():
            if child is not None:
                walk(join(prefix, name), child)

    walk("", model)
    return out


# ------------------------------------------------------------------ layout


@dataclass(frozen=True)
class _Entry:
    """One tensor of the reduction: where it goes and how it combines."""

    key: tuple[str, str, str]            # (group "stream"/"layer", name, part)
    shape: tuple[int, ...]
    kind: Kind
    fill: float                          # what a rank without it contributes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _scorer_entries(group: str, name: str, prefix: str, scorer: Scorer) -> list[_Entry]:
    """Entries of every state declared ``sum``/``max``/``min`` on ``scorer``."""
    out = []
    for state, red in scorer.reductions.items():
        if red == "none":
            continue
        shape = tuple(getattr(scorer, state).shape)
        out.append(_Entry((group, name, f"{prefix}{state}"), shape, red, _NEUTRAL[red]))
    return out


class GlobalReducer:
    """Reduces an :class:`~monitor.engine.Engine`'s states across ranks and computes the
    published values from the global copies (see the module docstring)."""

    def __init__(self, errors: ErrorLog) -> None:
        self.errors = errors
        self.collectives = 0            # collectives issued (for tests and the curious)
        self._cached: tuple[Any, list[_Entry]] | None = None
        self.compute_off: set[tuple[str, str]] = set()
        """(group, name) whose global compute failed on this rank: not computed here any more,
        but its local state still joins the reduction (the other ranks are unaffected)."""

    # ---------------------------------------------------------------- public

    def compute(self, engine: Engine, step: int | None) -> Readings:
        """Global values of every stream and layer of ``engine``; every rank must call this at
        the same publish. Falls back to local values (and counts an error) when the
        collectives themselves fail."""
        ws = world()
        if ws is None:
            return engine.compute(step=step)
        _, size = ws
        device = _collective_device()
        manifest = self._guarded("manifest", lambda: _manifest(engine), _empty_manifest())
        manifests: list[Any] = [None] * size
        try:
            dist.all_gather_object(manifests, manifest)
            self.collectives += 1
        except Exception as exc:
            self.errors.record("distributed", exc, key="distributed[all_gather_object]")
            return engine.compute(step=step)
        merged = self._guarded("merge", lambda: _merge(manifests, self.errors),
                               {"streams": {}, "layers": {}})
        entries = self._guarded("layout", lambda: self._layout(engine, merged), [])
        sums = [e for e in entries if e.kind == "sum"]
        gathered = [e for e in entries if e.kind != "sum"]
        sum_buf = self._pack(engine, sums, device)
        gat_buf = self._pack(engine, gathered, device)
        try:
            if sum_buf.numel():
                dist.all_reduce(sum_buf, op=dist.ReduceOp.SUM)
                self.collectives += 1
            parts: list[Tensor] = []
            if gat_buf.numel():
                parts = [torch.empty_like(gat_buf) for _ in range(size)]
                dist.all_gather(parts, gat_buf)
                self.collectives += 1
        except Exception as exc:
            self.errors.record("distributed", exc, key="distributed[collective]")
            return engine.compute(step=step)
        try:
            reduced = _unpack(sums, sum_buf, gathered, parts)
            view = _view(engine, merged, reduced, self.compute_off)
        except Exception as exc:
            self.errors.record("distributed", exc, key="distributed[view]")
            return engine.compute(step=step)
        result = view.compute(step=step)
        self._write_back(engine, view, self.compute_off)
        return result

    # ---------------------------------------------------------------- helpers

    def _layout(self, engine: Engine, merged: dict[str, Any]) -> list[_Entry]:
        """:func:`_layout`, cached while the set of streams and layers stays the same."""
        key = (tuple((n, g["dim"], g["nc"]) for n, g in merged["streams"].items()),
               tuple((n, g["units"]) for n, g in merged["layers"].items()))
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, _layout(engine, merged))
        return self._cached[1]

    def _guarded(self, what: str, make: Callable[[], Any], fallback: Any) -> Any:
        try:
            return make()
        except Exception as exc:
            self.errors.record("distributed", exc, key=f"distributed[{what}]")
            return fallback

    def _pack(self, engine: Engine, entries: list[_Entry], device: torch.device) -> Tensor:
        """One float64 buffer of the local values of ``entries`` (neutral where a rank has
        none, is disabled or fails to produce one)."""
        chunks: list[Tensor] = []
        memo: dict[str, Any] = {}
        for entry in entries:
            try:
                value = _local_value(engine, entry, memo)
                if value is not None and tuple(value.shape) != entry.shape:
                    raise ValueError(f"{entry.key}: local shape {tuple(value.shape)} differs from "
                                     f"the agreed {entry.shape}")
            except Exception as exc:
                self.errors.record("distributed", exc, key=f"distributed[{entry.key[1]}]")
                value = None
            if value is None:
                value = torch.full(entry.shape, entry.fill, dtype=torch.float64, device=device)
            chunks.append(value.detach().to(device=device, dtype=torch.float64).reshape(-1))
        if not chunks:
            return torch.zeros(0, dtype=torch.float64, device=device)
        return torch.cat(chunks)

    @staticmethod
    def _write_back(engine: Engine, view: Engine, compute_off: set[tuple[str, str]]) -> None:
        """Adopt the global Q-Score calibration locally; remember what failed to compute."""
        for name, vs in view.streams.items():
            local = engine.streams.get(name)
            if local is vs:
                continue                           # published locally (not reduced)
            if not vs.enabled:
                compute_off.add(("stream", name))
            lq, vq = (local.qscore if local is not None else None), vs.qscore
            if lq is not None and vq is not None and vq.calibrated and not lq.calibrated:
                lq.threshold_q = vq.threshold_q.detach().to(lq.device).clone()
                lq.calibrated = True
        for name, vl in view.layers.items():
            if engine.layers.get(name) is not vl and not vl.enabled:
                compute_off.add(("layer", name))


def _collective_device() -> torch.device:
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _empty_manifest() -> dict[str, Any]:
    return {"streams": {}, "layers": {}}


def _manifest(engine: Engine) -> dict[str, Any]:
    """What this rank holds: streams (dim, has labels, Q-Score host counters), layers (units).
    Disabled parts are listed with ``enabled=False`` (they contribute neutral values)."""
    streams = {}
    for name, st in engine.streams.items():
        q = st.qscore
        streams[name] = {"dim": st.dim, "enabled": st.enabled, "nc": st.nc is not None,
                         "q_filled": q._ring.filled if q is not None and st.enabled else 0,
                         "q_calibrated": bool(q is not None and q.calibrated and st.enabled)}
    layers = {name: {"units": ly.units, "enabled": ly.enabled}
              for name, ly in engine.layers.items()}
    return {"streams": streams, "layers": layers}


def _merge(manifests: list[Any], errors: ErrorLog) -> dict[str, Any]:
    """Union of the ranks' manifests (same on every rank); names whose dimension differs
    between ranks are left out (published locally) and counted."""
    streams: dict[str, dict[str, Any]] = {}
    layers: dict[str, dict[str, Any]] = {}
    bad: set[tuple[str, str]] = set()
    for m in manifests:
        m = m or _empty_manifest()
        for name, s in sorted(m.get("streams", {}).items()):
            g = streams.setdefault(name, {"dim": s["dim"], "enabled": False, "nc": False,
                                          "q_filled": 0, "q_calibrated": False})
            if g["dim"] != s["dim"]:
                bad.add(("stream", name))
            g["enabled"] = g["enabled"] or s["enabled"]
            g["nc"] = g["nc"] or s["nc"]
            g["q_filled"] += int(s["q_filled"])
            g["q_calibrated"] = g["q_calibrated"] or s["q_calibrated"]
        for name, ly in sorted(m.get("layers", {}).items()):
            g = layers.setdefault(name, {"units": ly["units"], "enabled": False})
            if g["units"] != ly["units"]:
                bad.add(("layer", name))
            g["enabled"] = g["enabled"] or ly["enabled"]
    for group, name in sorted(bad):
        errors.record("distributed", ValueError(
            f"{group} {name!r} has different dimensions on different ranks; it is published "
            "per rank (watch the same modules with the same names on every rank)"),
            key=f"distributed[dim:{name}]")
        (streams if group == "stream" else layers).pop(name)
    return {"streams": {k: v for k, v in streams.items() if v["enabled"]},
            "layers": {k: v for k, v in layers.items() if v["enabled"]}}


def _prototype_stream(engine: Engine, name: str, dim: int, nc: bool,
                      device: torch.device) -> Stream:
    """An empty stream shaped like the other ranks' (for a rank that has none)."""
    stream = Stream(name, dim, engine.window, device, engine.spectrum_kwargs,
                    engine.qscore_kwargs, engine.spectral)
    if nc:
        from monitor.scorers.neural_collapse import NeuralCollapseScorer
        stream.nc = NeuralCollapseScorer(dim, engine.max_classes, 2, device)
    return stream


def _prototype_layer(engine: Engine, name: str, units: int, device: torch.device) -> Layer:
    return Layer(name, units, 2, device, engine.taus, engine.low_activity_rate,
                 engine.spectral.resolved(name, units, engine.window))


def _layout(engine: Engine, merged: dict[str, Any]) -> list[_Entry]:
    """The ordered entries of the reduction, identical on every rank (from the merged
    manifest and the shared Monitor options only; small prototypes give the shapes)."""
    from monitor.scorers.activations import ActivationScorer
    from monitor.scorers.neural_collapse import NeuralCollapseScorer
    from monitor.scorers.qscore import QScoreScorer

    cpu = torch.device("cpu")
    entries: list[_Entry] = []
    q_proto: QScoreScorer | None = None
    if engine.qscore_kwargs is not None:                 # as Stream builds it
        options = {"min_calibration_samples": min(256, engine.window), **engine.qscore_kwargs}
        q_proto = QScoreScorer(window=engine.window, device=cpu, **options)
    for name, g in merged["streams"].items():
        d = int(g["dim"])
        moments = engine.spectral.resolved(name, d, engine.window).make(name, d, 2, cpu)
        entries += _scorer_entries("stream", name, "m.", moments)
        entries += [_Entry(("stream", name, "neg"), (), "sum", 0.0),
                    _Entry(("stream", name, "neg_total"), (), "sum", 0.0)]
        if q_proto is not None:
            q = q_proto
            entries += _scorer_entries("stream", name, "q.", q)
            entries += [_Entry(("stream", name, "q.ring_q"), (q.window,), "cat", math.nan),
                        _Entry(("stream", name, "q.eval_q"), (q.eval_window,), "cat", math.nan),
                        _Entry(("stream", name, "q.eval_wrong"), (q.eval_window,), "cat", 0.0),
                        _Entry(("stream", name, "q.threshold_q"), (), "cat", math.nan)]
        if g["nc"]:
            c = engine.max_classes
            entries += _scorer_entries("stream", name, "nc.",
                                       NeuralCollapseScorer(d, c, 2, cpu))
            entries += [_Entry(("stream", name, "nc.S"), (d, d), "sum", 0.0),
                        _Entry(("stream", name, "nc.sums"), (c, d), "sum", 0.0),
                        _Entry(("stream", name, "nc.counts"), (c,), "sum", 0.0)]
    for name, g in merged["layers"].items():
        units = int(g["units"])
        entries += _scorer_entries("layer", name, "a.", ActivationScorer(
            units, taus=engine.taus, low_activity_rate=engine.low_activity_rate, device=cpu))
        moments = engine.spectral.resolved(name, units, engine.window).make(name, units, 2, cpu)
        entries += _scorer_entries("layer", name, "m.", moments)
    return entries


def _local_value(engine: Engine, entry: _Entry,
                 memo: dict[str, Any] | None = None) -> Tensor | None:
    """This rank's value of ``entry`` (None: contribute the neutral fill); ``memo`` keeps the
    neural-collapse statistics of a stream for its three entries."""
    group, name, part = entry.key
    if group == "layer":
        layer = engine.layers.get(name)
        if layer is None or not layer.enabled:
            return None
        owner, _, state = part.partition(".")
        if owner == "m":
            layer.moments.settle()
            return getattr(layer.moments, state)
        return getattr(layer.activations, state)
    stream = engine.streams.get(name)
    if stream is None or not stream.enabled:
        return None
    m = stream.moments
    if part in ("neg", "neg_total"):
        valid = m.ring_valid > 0                                          # (window,)
        if part == "neg":
            return m.negative_count()
        return valid.sum().to(torch.float64) * stream.dim
    owner, _, state = part.partition(".")
    if owner == "m":
        m.settle()
        return getattr(m, state)
    if owner == "q":
        return getattr(stream.qscore, state) if stream.qscore is not None else None
    if stream.nc is None:
        return None
    if state in ("S", "sums", "counts"):
        memo = {} if memo is None else memo
        if memo.get("nc_name") != name:
            memo["nc_name"], memo["nc_stats"] = name, stream.nc.statistics()
        s, sums, counts = memo["nc_stats"]
        return {"S": s, "sums": sums, "counts": counts}[state]
    return getattr(stream.nc, state)


def _unpack(sums: list[_Entry], sum_buf: Tensor, gathered: list[_Entry],
            parts: list[Tensor]) -> dict[tuple[str, str, str], Tensor]:
    """The global value of every entry."""
    out: dict[tuple[str, str, str], Tensor] = {}
    i = 0
    for e in sums:
        out[e.key] = sum_buf[i:i + e.numel].reshape(e.shape)
        i += e.numel
    if gathered:
        stacked = torch.stack(parts)                                       # (world, G)
        i = 0
        for e in gathered:
            chunk = stacked[:, i:i + e.numel]                              # (world, numel)
            i += e.numel
            if e.kind == "max":
                out[e.key] = chunk.amax(0).reshape(e.shape)
            elif e.kind == "min":
                out[e.key] = chunk.amin(0).reshape(e.shape)
            elif e.shape == ():                                            # the threshold
                finite = torch.isfinite(chunk[:, 0])                       # (world,)
                first = chunk[finite.to(torch.int8).argmax(), 0]
                out[e.key] = torch.where(finite.any(), first, torch.full_like(first, math.nan))
            else:                                                          # union of windows
                out[e.key] = chunk.reshape(-1, *e.shape[1:])
    return out


def _with_states(scorer: Any, values: dict[str, Tensor]) -> Any:
    """A shallow copy of ``scorer`` whose states are ``values`` (on the scorer's device)."""
    dup = copy.copy(scorer)
    for state, value in values.items():
        setattr(dup, state, value.to(scorer.device))
    return dup


def _view(engine: Engine, merged: dict[str, Any], reduced: dict[tuple[str, str, str], Tensor],
          compute_off: set[tuple[str, str]]) -> Engine:
    """A shallow copy of ``engine`` whose streams and layers hold the global states."""
    device = _collective_device()

    def parts(group: str, name: str, prefix: str) -> dict[str, Tensor]:
        return {part[len(prefix):]: v for (g, n, part), v in reduced.items()
                if g == group and n == name and part.startswith(prefix)}

    view = copy.copy(engine)
    view.streams = {}
    view.layers = {}
    names = list(engine.streams) + [n for n in merged["streams"] if n not in engine.streams]
    for name in names:
        local = engine.streams.get(name)
        if name not in merged["streams"]:
            if local is not None:
                view.streams[name] = local         # not reduced (dimension conflict): local
            continue
        g = merged["streams"][name]
        if (local is not None and not local.enabled) or ("stream", name) in compute_off:
            continue                               # switched off here after a failure
        base = local if local is not None else _prototype_stream(engine, name, g["dim"], g["nc"],
                                                                 device)
        vs = copy.copy(base)
        vs.moments = _with_states(base.moments, parts("stream", name, "m."))
        vs.moments._stale = False
        vs.moments._pending = 0
        neg, total = reduced[("stream", name, "neg")], reduced[("stream", name, "neg_total")]

        def negative_share(neg: Tensor = neg, total: Tensor = total,
                           dev: torch.device = base.device) -> Tensor:
            ratio = torch.where(total > 0, neg / total.clamp_min(1.0),
                                torch.full_like(total, math.nan))
            return ratio.to(dev)

        vs._negative_share = negative_share  # type: ignore[method-assign]
        if base.qscore is not None:
            q = _with_states(base.qscore, parts("stream", name, "q."))
            q.window = q.ring_q.shape[0]
            q.eval_window = q.eval_q.shape[0]
            q._ring = RingCursor(q.window)            # its own cursor: the base keeps its own
            q._ring.filled = min(q.window, int(g["q_filled"]))
            q.calibrated = bool(g["q_calibrated"])
            vs.qscore = q
        if g["nc"]:
            nc_base = base.nc
            if nc_base is None:
                from monitor.scorers.neural_collapse import NeuralCollapseScorer
                nc_base = NeuralCollapseScorer(g["dim"], engine.max_classes, 2, base.device)
            values = parts("stream", name, "nc.")
            stats = tuple(values.pop(k).to(nc_base.device) for k in ("S", "sums", "counts"))
            nc = _with_states(nc_base, values)
            nc.statistics = lambda stats=stats: stats  # type: ignore[method-assign]
            vs.nc = nc
        view.streams[name] = vs
    names = list(engine.layers) + [n for n in merged["layers"] if n not in engine.layers]
    for name in names:
        local_layer = engine.layers.get(name)
        if name not in merged["layers"]:
            if local_layer is not None:
                view.layers[name] = local_layer
            continue
        if (local_layer is not None and not local_layer.enabled) or ("layer", name) in compute_off:
            continue
        base_layer = (local_layer if local_layer is not None else
                      _prototype_layer(engine, name, merged["layers"][name]["units"], device))
        vl = copy.copy(base_layer)
        vl.activations = _with_states(base_layer.activations, parts("layer", name, "a."))
        vl.moments = _with_states(base_layer.moments, parts("layer", name, "m."))
        vl.moments._stale = False
        vl.moments._pending = 0
        view.layers[name] = vl
    return view

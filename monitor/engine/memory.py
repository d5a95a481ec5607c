"""How much device memory repwatch holds per stream and per watched layer: the formula, and a
measurement of what an object actually holds (``repwatch bench``, figure 6).

Per embedding stream of dimension ``d`` with a window of ``W`` rows (exact spectral path,
Q-Score on with its default evaluation window ``E = W``)::

    8·d²            float64 second moment S (d×d)
  + 4·W·d           float32 ring of the window's rows
  + 8·W             float64 row validity of the ring
  + 8·W + 16·E      float64 Q-Score ring, evaluation ring and its misclassified flags
  + 24·d + O(1)     float64 Σz, Σẑ, Σẑ², scalars and the Q-Score histogram

Per watched activation layer of ``u`` units: the same window state over units
(``8·u² + 4·W·u + 8·W + 24·u``) plus ``24·u`` for the dormancy sums. For d = 2048 and
W = 8192: 32 MiB + 64 MiB + a few hundred KiB. Transient memory at publish (the
eigendecomposition's d×d workspace and output) comes on top and is freed after it. The large-d
sketched path (``spectral_path``) holds the same state at the sketch dimension plus the
projection (see :mod:`monitor.scorers.sketch`).

**Checkpoints** (:func:`checkpoint_bytes`, ``Monitor.state_bytes()``): ``torch.save`` of
``Monitor.state_dict()`` holds the same tensors, less the sketch's ``Ω`` (drawn again from its
seed), plus :data:`TENSOR_OVERHEAD` bytes per tensor (its zip record, 64-byte alignment, its
pickled rebuild call and key) and about 1.4 KiB + 0.4 KiB per stream and layer of plain data
(alert states, peaks), and 5 KiB per sampling RNG::

  stream  8·d² + 4·W·d + 8·W + 24·d   window state: S, ring of rows, validity, sums
        + 8·W + 16·E + 8·B            Q-Score: scores, evaluation ring, B = 42 histogram cells
        + 4·W·d + 16·W                neural collapse (labelled streams): ring, labels, validity
  layer 8·u² + 4·W·u + 8·W + 48·u     window state over units, dormancy sums

``compact=True`` drops every ``W × d`` ring: per stream ``4·d(d+1) + 24·d + W`` (S's lower
triangle, the sums, each slot's validity as bool) + ``8·W + 8·B`` (Q-Score: the window's
scores stay, as window quantiles have no sufficient statistics; ``+ 9·E`` only when evaluation
batches came) ``+ 4·d(d+1) + 8·C'(d+1) + W`` for neural collapse (C': classes up to the
highest label in the window); per layer ``4·u(u+1) + 48·u + W``. Measured (``torch.save``,
W = 8192, Q-Score on): d = 256, 9.19 MB full, 0.36 MB compact (1/26; 1/31 without Q-Score);
d = 2048, 101 MB and 16.9 MB (1/6: S dominates); docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from monitor.functional.sketch import exact_state_bytes, sketch_state_bytes

_SCALARS = 8 * 16      # a handful of float64 scalar states (n, seen, nonfinite, counts, ...)


def _window_bytes(dim: int, window: int, sketch_dim: int | None) -> int:
    return (exact_state_bytes(dim, window) if sketch_dim is None
            else sketch_state_bytes(dim, window, sketch_dim))


def stream_state_bytes(dim: int, window: int, *, qscore: bool = True,
                       eval_window: int | None = None, qscore_buckets: int = 42,
                       sketch_dim: int | None = None) -> int:
    """Formula: bytes of one embedding stream's state (``sketch_dim``: on the sketched path)."""
    d, w = dim, window
    total = _window_bytes(d, w, sketch_dim) + _SCALARS
    if qscore:
        e = w if eval_window is None else eval_window
        total += 8 * w + 16 * e + 8 * (qscore_buckets + 41) + _SCALARS
    return total


def layer_state_bytes(units: int, window: int, *, sketch_dim: int | None = None) -> int:
    """Formula: bytes of one watched activation layer's state (``sketch_dim``: sketched)."""
    u, w = units, window
    return _window_bytes(u, w, sketch_dim) + 24 * u + 2 * _SCALARS


def _tensors(obj: Any, seen: set[int], depth: int = 0) -> Iterator[Tensor]:
    """Every tensor reachable from ``obj`` through attributes, dicts, lists and tuples."""
    if id(obj) in seen or depth > 8:
        return
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        yield obj
        return
    if isinstance(obj, dict):
        children: Any = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("monitor"):
        children = list(vars(obj).values())
    else:
        return
    for child in children:
        yield from _tensors(child, seen, depth + 1)


def device_tensors(obj: Any) -> list[Tensor]:
    """The tensors reachable from ``obj`` that live on a device (not the CPU or meta)."""
    return [t for t in _tensors(obj, set()) if t.device.type not in ("cpu", "meta")]


def held_bytes(obj: Any) -> int:
    """Measured: bytes of the distinct tensor storages reachable from ``obj`` (an engine
    stream or layer, a scorer), each storage counted once however many views share it."""
    storages: dict[tuple[str, int], int] = {}
    for t in _tensors(obj, set()):
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        storages[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def available_device(name: str) -> torch.device:
    """The device a checkpoint's ``name`` loads on: itself, or the CPU when it is a CUDA
    device and CUDA is absent."""
    dev = torch.device(name)
    return dev if dev.type != "cuda" or torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------- checkpoint size

TENSOR_OVERHEAD = 240
"""Bytes ``torch.save`` adds per tensor (measured: 200–320, 240 fitted): its zip record, the
padding that aligns each storage to 64 bytes, the pickled rebuild call and the key naming it."""

_PLAIN_BASE = 1350       # the Monitor state's plain data: version, run, step, errors, alerts
_PLAIN_PER_OWNER = 430   # per stream or layer: its entry's keys, peaks, lows, baselines, alerts
_GENERATOR_STATE = {"cpu": 5056}   # bytes of a torch.Generator's state (CUDA: 16)


def _saved(tensors: int, payload: int) -> int:
    return payload + tensors * TENSOR_OVERHEAD


def moments_checkpoint_bytes(dim: int, window: int, *, sketch_dim: int | None = None,
                             compact: bool = False) -> int:
    """Formula: bytes of a window state in a checkpoint (``sketch_dim``: sketched; then the
    state is ``sketch_dim``-dimensional, and ``Ω`` is not saved)."""
    k, w = (dim if sketch_dim is None else sketch_dim), window
    sketch = 0 if sketch_dim is None else 3            # (k, seed, d) of the sketch
    if compact:       # S's lower triangle, Σz Σẑ Σẑ², n seen nonfinite negatives, validity, cursor
        return _saved(12 + sketch, 4 * k * (k + 1) + 24 * k + 32 + w + 16 + 1 + 8 * sketch)
    ring_neg = 0 if sketch_dim is None else 8 * w
    # exact_state_bytes: S, ring, validity, Σz, Σẑ, Σẑ² and n, seen, nonfinite; + the cursor
    return _saved(11 + sketch + (sketch_dim is not None),
                  exact_state_bytes(k, w) + 16 + ring_neg + 8 * sketch)


def qscore_checkpoint_bytes(window: int, eval_window: int | None = None, *,
                            buckets: int = 42, compact: bool = False,
                            eval_rows: bool = False) -> int:
    """Formula: bytes of a stream's Q-Score state in a checkpoint (``buckets``: histogram
    cells; ``eval_rows``: whether evaluation batches came, which only a compact state asks)."""
    e = window if eval_window is None else eval_window
    fixed = 8 * window + 8 * buckets + 4 * 8 + 4 * 8 + 1     # scores, histogram, scalars, cursors
    if not compact:
        return _saved(13, fixed + 16 * e)
    return _saved(14, fixed + 1 + 9 * e) if eval_rows else _saved(12, fixed + 1)


def nc_checkpoint_bytes(dim: int, window: int, classes: int, *, compact: bool = False) -> int:
    """Formula: bytes of a labelled stream's neural-collapse state in a checkpoint."""
    d, w, c = dim, window, classes
    if compact:       # S's lower triangle, class sums and counts, NC4, validity, counters
        return _saved(9, 1 + 4 * d * (d + 1) + 8 * c * (d + 1) + 8 + w + 16 + 8)
    return _saved(6, 4 * w * d + 16 * w + 16 + 8)


def stream_checkpoint_bytes(dim: int, window: int, *, qscore: bool = True,
                            eval_window: int | None = None, eval_rows: bool = False,
                            qscore_buckets: int = 42, sketch_dim: int | None = None,
                            nc_classes: int | None = None, compact: bool = False) -> int:
    """Formula: bytes of one embedding stream in ``torch.save(Monitor.state_dict(compact))``
    (``nc_classes``: when the stream got labels, the classes up to the highest label in its
    window, which only a compact state asks)."""
    total = moments_checkpoint_bytes(dim, window, sketch_dim=sketch_dim, compact=compact)
    if qscore:
        total += qscore_checkpoint_bytes(window, eval_window, buckets=qscore_buckets,
                                         compact=compact, eval_rows=eval_rows)
    if nc_classes is not None:
        total += nc_checkpoint_bytes(dim, window, nc_classes, compact=compact)
    return total + _PLAIN_PER_OWNER


def layer_checkpoint_bytes(units: int, window: int, *, sketch_dim: int | None = None,
                           compact: bool = False) -> int:
    """Formula: bytes of one watched activation layer in a checkpoint."""
    activations = _saved(6, 24 * units + 24)               # Σ|h|, Σ1[h≠0], ever active; counts
    return (moments_checkpoint_bytes(units, window, sketch_dim=sketch_dim, compact=compact)
            + activations + _PLAIN_PER_OWNER)


def _pair_checkpoint_bytes(dim: int, reservoir: int, rng: str) -> int:
    m = reservoir
    return _saved(10, 8 * m * dim + 16 * m + 8 + 32 + _GENERATOR_STATE.get(rng, 16))


def checkpoint_bytes(engine: Any, *, compact: bool = False,
                     generators: Any = ("cpu",)) -> int:
    """Formula: bytes of ``torch.save(Monitor.state_dict(compact=compact))`` for ``engine``'s
    streams, layers and GAN pairs as they are now (dimensions, sketch, Q-Score, labels), and the
    sampling generators on ``generators`` (device types). Read from shapes only: no device
    work, except the highest label of a labelled stream's window for a compact state. Within
    a few KiB and 1 % of the measured size (``tests/engine/test_checkpoint_size.py``);
    a full state saved while a compact load's sums are still being evicted adds them."""
    total = _PLAIN_BASE
    for st in engine.streams.values():
        m, q, nc = st.moments, st.qscore, st.nc
        total += stream_checkpoint_bytes(
            st.dim, engine.window, qscore=q is not None,
            eval_window=None if q is None else q.eval_window,
            eval_rows=q is not None and q._eval_ring.filled > 0,
            qscore_buckets=42 if q is None else int(q.bucket_edges.shape[0]) + 1,
            sketch_dim=getattr(m, "sketch_dim", None),
            nc_classes=None if nc is None else (nc.saved_classes() if compact else 0),
            compact=compact)
        if not compact:
            total += sum(_block_bytes(part) for part in (m, nc) if part is not None)
    for ly in engine.layers.values():
        total += layer_checkpoint_bytes(ly.units, engine.window,
                                        sketch_dim=getattr(ly.moments, "sketch_dim", None),
                                        compact=compact)
        if not compact:
            total += _block_bytes(ly.moments)
    for _, scorer in engine.pairs.values():
        if scorer is not None and not isinstance(scorer, dict):
            total += _pair_checkpoint_bytes(scorer.dim, scorer.reservoir, scorer.device.type)
    for device in generators:
        total += _saved(1, _GENERATOR_STATE.get(torch.device(device).type, 16))
    return total


def _block_bytes(part: Any) -> int:
    """A restored compact block still in a full checkpoint (``_block.*``)."""
    block = getattr(part, "_block", None)
    if block is None:
        return 0
    payload = sum(t.numel() * t.element_size() for t in block.tensors.values())
    return _saved(len(block.tensors) + 4, payload + block.size + 24)

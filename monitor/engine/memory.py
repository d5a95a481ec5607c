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

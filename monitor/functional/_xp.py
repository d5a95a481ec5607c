"""What the array-API functions of :mod:`monitor.functional` share: the array type, float64
casts, the one scatter-add (which the array API lacks) and numpy's silence on masked 0/0.

numpy and torch both run these functions (``array_api_compat`` gives each its namespace); the
in-process monitor passes torch tensors, the torch-free sidecar numpy arrays. Undefined values
are computed and then masked to NaN with ``where`` (no data-dependent branch: that would sync a
device), so numpy would warn about a division it is told to discard: :func:`quiet` stops that.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from array_api_compat import array_namespace, device

Array = Any
"""A numpy array or a torch tensor (anything ``array_api_compat.array_namespace`` accepts)."""

F = TypeVar("F", bound=Callable[..., Any])


def f64(xp: Any, x: Array) -> Array:
    """``x`` as float64 (a no-op when it already is)."""
    return xp.astype(x, xp.float64)


def scalar(xp: Any, value: Array | float, like: Array) -> Array:
    """``value`` as a 0-d float64 array on ``like``'s device (a device tensor stays one: no sync)."""
    return xp.asarray(value, dtype=xp.float64, device=device(like))


def as_rows(x: Array, what: str = "rows") -> Array:
    """``x`` as float64 ``(n, d)`` rows, or a clear error (not 2-D, not floating point)."""
    xp = array_namespace(x)
    if x.ndim != 2:
        raise ValueError(f"expected {what} as a 2-D (n, d) array, got shape {tuple(x.shape)}")
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"expected floating-point {what}, got {x.dtype}")
    return f64(xp, x)


def scatter_add(xp: Any, out: Array, index: Array, values: Array) -> Array:
    """``out[index[i]] += values[i]`` along axis 0, repeated indices summed: torch's
    ``index_add_`` or numpy's ``add.at`` (the array API has no scatter), in place."""
    if isinstance(out, np.ndarray):
        np.add.at(out, index, values)
        return out
    return out.index_add_(0, index, values)


def quiet(func: F) -> F:
    """Run ``func`` with numpy's divide/invalid warnings off (masked 0/0, see module doc)."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return func(*args, **kwargs)
    return wrapper  # type: ignore[return-value]

"""The engine: windows, the scorers' grouping per stream and layer, and publishing.

:mod:`~monitor.engine.engine` (the :class:`Engine` of streams and layers; torch),
:mod:`~monitor.engine.paths` (rows scored here or shipped to a sidecar),
:mod:`~monitor.engine.side_streams`, :mod:`~monitor.engine.distributed` (cross-rank reduction
at publish) and :mod:`~monitor.engine.memory` need torch; :mod:`~monitor.engine.run` (the run
clock and publisher), :mod:`~monitor.engine.tracking` (run-relative signals),
:mod:`~monitor.engine.window` (the ring cursor) and :mod:`~monitor.engine.overhead` (the
overhead budget) do not: the torch-free sidecar imports them. Hence this package imports
nothing eagerly: ``Engine``, ``Stream`` and ``Layer`` are loaded from
:mod:`monitor.engine.engine` on first use (``Readings``, the host values of a compute, is in
:mod:`monitor.snapshot`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monitor.engine.engine import Engine, Layer, Stream

__all__ = ["Engine", "Layer", "Stream"]


def __getattr__(name: str) -> Any:
    # torch-using: loaded on first use so that importing a torch-free submodule stays torch-free.
    if name in __all__:
        from monitor.engine import engine

        value = getattr(engine, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

"""A Monitor's checkpoint: ``state_dict`` and an all-or-nothing ``load_state_dict``.

A mixin of :class:`monitor.Monitor` (which owns the state it saves: the engine's windows and
peaks, the alert states, the error counts, the samplers' RNG and the step). ``state_dict``
documents the checkpoint's size and its ``compact`` form (sufficient statistics without the
rings of rows); ``state_bytes`` computes that size. Loading an earlier
checkpoint into a monitor that has published further is a resume: the history drops what came
after (:meth:`monitor.engine.run.RunPublisher.rewind`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from monitor.engine.memory import available_device, checkpoint_bytes, device_tensors

if TYPE_CHECKING:
    import threading

    from monitor.capture import Generators
    from monitor.config import MonitorConfig
    from monitor.engine import Engine
    from monitor.engine.run import RunPublisher
    from monitor.engine.side_streams import SideStreams
    from monitor.errors import ErrorLog


class Checkpointing:
    """``state_dict`` / ``load_state_dict`` of a :class:`monitor.Monitor`."""

    config: MonitorConfig
    _engine: Engine
    _lock: threading.RLock
    _side: SideStreams
    _errors: ErrorLog
    _publisher: RunPublisher
    _generator: Generators
    _step: int
    _published_step: int

    def state_dict(self, compact: bool = False) -> dict[str, Any]:
        """Everything needed to resume: step, windows, peaks, alert states, RNG, errors.

        **Size** of ``torch.save(state)``: :meth:`state_bytes` computes it for this monitor
        now; the formulas are :func:`monitor.engine.memory.checkpoint_bytes` and its helpers.
        With W = ``window``, d a stream's dimension (the sketch's k on the sketched path), u a
        layer's units, E the Q-Score evaluation window (= W by default), m a ``pair()``
        reservoir, plus 240 bytes per tensor and about 1.4 KiB + 0.4 KiB per stream and layer
        of plain data and 5 KiB per sampling RNG::

            per stream   8·d² + 4·W·d + 8·W + 24·d     window: S, ring of rows, validity, sums
                       + 8·W + 16·E + 400           Q-Score (on by default)
                       + 4·W·d + 16·W               neural collapse, once labels came
            per layer    8·u² + 4·W·u + 8·W + 48·u
            per pair()   8·m·d + 16·m + 5 KiB

        The ``4·W·d`` rings dominate: at W = 8192, d = 256 a stream is 9.19 MB.

        **compact=True** keeps the sufficient statistics (S, Σz, Σẑ, Σẑ², n, counters, peaks,
        alert states, RNG, the Q-Score threshold, histogram and scores) and drops every ring of
        rows: per stream ``4·d(d+1) + 24·d + W`` (S's lower triangle, the sums, each slot's
        validity as bool) + ``8·W + 400`` (Q-Score: the window's scores stay, 8 bytes a row, as
        window quantiles have no sufficient statistics; ``+ 9·E`` when evaluation batches came)
        + ``4·d(d+1) + 8·C'(d+1) + W`` for neural collapse (C': classes up to the highest label
        in the window); per layer ``4·u(u+1) + 48·u + W``; pairs as in full. Measured at
        W = 8192, d = 256, one stream: 9.19 MB full, 0.36 MB compact (1/26; 1/31 without
        Q-Score); 3 streams of d = 128 and 2 layers of 256 units: 22.8 MB and 0.74 MB (1/31);
        d = 2048: 101 MB and 16.9 MB (S dominates). docs/performance.md.

        **Loading a compact state** restores the window approximately
        (:class:`~monitor.scorers.state.FrozenBlock`): right after the load the sums, counts
        and so every signal are the saved ones (the first publish equals the one before the
        save, within float64 round-off); each new row then evicts one saved row in ring order,
        as the exact window would, and as the saved rows are gone each evicted one takes the
        saved rows' mean with it (the row count stays exact; the sums are correct in
        expectation); after ``window`` new rows the window holds new rows only and is exact
        again. The Q-Score window is exact throughout; neural collapse's NC4 keeps, for the
        saved rows left, its value against the classifier of the save. Until then the saved
        sums stay on the device beside the live ones (one more d×d per stream). A full state
        saved in between keeps them too. ``repwatch select`` needs the rows: a full state."""
        self._side.join()
        with self._lock:
            return {
                "version": 1, "run": self.config.run, "step": self._step,
                "compact": bool(compact),
                "engine": self._engine.state_dict(compact=compact),
                "alerts": self._publisher.alerts.state_dict(),
                "errors": self._errors.counts(),
                "generators": self._generator.state_dict(),
            }

    def state_bytes(self, compact: bool = False) -> int:
        """Bytes of ``torch.save(self.state_dict(compact=compact))`` now, by the formula of
        :meth:`state_dict` (within 1 KiB + 1 %, tested); from shapes only, but for a compact
        state of a labelled stream, which reads the highest label of its window (a sync)."""
        with self._lock:
            return checkpoint_bytes(self._engine, compact=compact,
                                    generators=[str(d) for d in self._generator.by_device])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, full or compact (streams on CUDA load on the CPU when
        CUDA is absent; the window must be this monitor's). All or nothing: a checkpoint that
        fails to load leaves the monitor as it was."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("not a repwatch Monitor state_dict (version 1)")
        with self._lock:
            previous = self.state_dict()
            try:
                self._apply(state)
            except BaseException:
                self._apply(previous)
                raise

    def _apply(self, state: dict[str, Any]) -> None:
        self._side.join()
        self._engine.load_state_dict(state["engine"], available_device)
        for stream in self._engine.streams.values():   # now read on the side stream
            self._side.hand(stream.device, device_tensors(stream))
        self._publisher.alerts.load_state_dict(state["alerts"])
        self._errors.load(state.get("errors", {}))
        self._generator.load_state_dict(state.get("generators", {}), available_device)
        step, latest = int(state["step"]), self._publisher.latest
        if latest is not None and step < latest.step:    # resumed from an earlier checkpoint
            self._publisher.rewind(step, self._step)
        self._step = step
        self._published_step = step                      # close() publishes steps after it


__all__ = ["Checkpointing"]

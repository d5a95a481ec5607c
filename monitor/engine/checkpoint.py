"""A Monitor's checkpoint: ``state_dict`` and an all-or-nothing ``load_state_dict``.

A mixin of :class:`monitor.Monitor` (which owns the state it saves: the engine's windows and
peaks, the alert states, the error counts, the samplers' RNG and the step). Loading an earlier
checkpoint into a monitor that has published further is a resume: the history drops what came
after (:meth:`monitor.engine.run.RunPublisher.rewind`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from monitor.engine.memory import available_device, device_tensors

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

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step, windows, peaks, alert states, RNG, errors."""
        self._side.join()
        with self._lock:
            return {
                "version": 1, "run": self.config.run, "step": self._step,
                "engine": self._engine.state_dict(),
                "alerts": self._publisher.alerts.state_dict(),
                "errors": self._errors.counts(),
                "generators": self._generator.state_dict(),
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (streams on CUDA load on the CPU when CUDA is absent).
        All or nothing: a checkpoint that fails to load leaves the monitor as it was."""
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

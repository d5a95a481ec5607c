"""Lightning callback: a :class:`~monitor.monitor.Monitor` attached for the length of ``fit``.

>>> from monitor.integrations.lightning import RepwatchCallback
>>> cb = RepwatchCallback(layers=["encoder"], run="exp1", every=10, port=9400)  # doctest: +SKIP
>>> trainer = lightning.pytorch.Trainer(callbacks=[cb])                           # doctest: +SKIP

Uses ``lightning`` (``pip install lightning``) and falls back to ``pytorch_lightning``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - the fallback package
    try:
        from pytorch_lightning import Callback, LightningModule, Trainer
    except ImportError:
        raise ImportError("monitor.integrations.lightning needs Lightning: "
                          "pip install lightning  (or pytorch-lightning)") from None

from monitor.integrations._attach import (Layer, attach, check_activations, check_layers,
                                         check_monitor_kwargs, check_port, publish_pending)
from monitor.loggers import scalars
from monitor.monitor import Monitor
from monitor.snapshot import Snapshot


class RepwatchCallback(Callback):
    """Watch ``layers`` of the LightningModule while it trains.

    On fit start a Monitor is created (``run``, ``every``, ``port`` and ``**monitor_kwargs``
    go to :class:`~monitor.monitor.Monitor`) and each of ``layers`` (a submodule path such as
    ``"encoder"`` or the module itself) is watched; ``activations`` (True or module names)
    adds plasticity tracking. The monitor steps once per optimizer step
    (``trainer.global_step``), closes at fit end or on an exception, and its state travels
    in Lightning checkpoints (``state_dict`` / ``load_state_dict``). Only global rank zero
    serves ``port``; the other ranks run with ``port=None``. Hooks return None and never
    touch the training state.

    Each publish's scalars (:func:`monitor.loggers.scalars`: ``repwatch/<stream>/<signal>``,
    ...) go to every logger of the Trainer (``trainer.loggers``: TensorBoard, CSV, W&B,
    MLflow, ...) through ``log_metrics(scalars, step)``, at the step Lightning logs that batch's
    own ``self.log`` values at (the optimizer steps before it: the loss of the same forward
    pass; ``log_scalars=False``: not logged). At train end the steps since the last publish are
    published (and logged) before the loggers close.

    ``callback.monitor`` is the Monitor of the latest fit (kept after close to read
    ``latest`` / ``history``).
    """

    def __init__(self, layers: Sequence[Layer] | None = None, *,
                 activations: bool | Sequence[str] = False, run: str = "default",
                 every: int = 10, port: int | None = None, log_scalars: bool = True,
                 **monitor_kwargs: Any) -> None:
        self.layers = check_layers(layers)
        self.activations = check_activations(activations)
        if not self.layers and not self.activations:
            raise ValueError("RepwatchCallback needs layers=[...] and/or activations=")
        self.port = check_port(port)
        self.log_scalars = bool(log_scalars)
        self.monitor_kwargs = {"run": run, "every": every, **monitor_kwargs}
        check_monitor_kwargs(self.monitor_kwargs)   # bad arguments fail here, not later
        self.monitor: Monitor | None = None
        self._pending_state: dict[str, Any] | None = None
        self._last_global_step = 0

    @property
    def state_key(self) -> str:
        return f"RepwatchCallback[run={self.monitor_kwargs['run']}]"

    # ---------------------------------------------------------------- lifecycle

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.close()
        self.monitor = attach(pl_module, self.layers, self.activations,
                              serve=bool(trainer.is_global_zero), port=self.port,
                              monitor_kwargs=self.monitor_kwargs)
        if self._pending_state is not None:
            self.monitor.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the restored global step is known only from here on (after restore_training_state)
        self._last_global_step = int(trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.monitor is None:
            return None
        done = int(trainer.global_step) - self._last_global_step
        if done > 0:       # an optimizer step happened (not during gradient accumulation)
            self._last_global_step += done
            self._log(trainer, self.monitor.step(done), ended=False)
        return None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the loggers are finalized after fit end: the last partial cadence still reaches them
        self._log(trainer, publish_pending(self.monitor), ended=True)

    def _log(self, trainer: Trainer, snap: Snapshot | None, ended: bool) -> None:
        """``snap``'s scalars to each of the Trainer's loggers, at the step Lightning logs the
        latest batch's ``self.log`` values at (a failing logger is counted in
        ``repwatch_errors_total{component="callback"}``, not raised)."""
        if snap is None or not self.log_scalars or self.monitor is None:
            return
        loggers = getattr(trainer, "loggers", None) or []
        if not loggers:
            return
        metrics = scalars(snap)
        step = _logger_step(trainer, snap, ended)
        for logger in loggers:
            with self.monitor.errors.guard("callback", key=f"logger[{type(logger).__name__}]"):
                logger.log_metrics(metrics, step=step)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        if self.monitor is not None:
            self.monitor.close()

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The Monitor's state (tensors and plain data; picklable), empty before any fit."""
        if self.monitor is not None:
            return {"monitor": self.monitor.state_dict()}
        if self._pending_state is not None:
            return {"monitor": self._pending_state}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore on the next fit start (Lightning restores callbacks before it)."""
        monitor_state = state_dict.get("monitor")
        if monitor_state is None:
            return
        if self.monitor is not None and not self.monitor._closed:
            self.monitor.load_state_dict(monitor_state)
        else:
            self._pending_state = monitor_state


def _logger_step(trainer: Trainer, snap: Snapshot, ended: bool) -> int:
    """The step Lightning logs the latest training batch's metrics at: the batches that had
    stepped the optimizers *before* it (``fit_loop.epoch_loop._batches_that_stepped``, counted
    once per batch whatever the number of optimizers; Lightning adds this batch after
    ``on_train_batch_end``), so that repwatch's values sit beside the loss of the forward
    passes they were computed from. Without that counter: the monitor's step minus one."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    stepped = getattr(loop, "_batches_that_stepped", None)
    if isinstance(stepped, int) and not isinstance(stepped, bool):
        return max(stepped - 1, 0) if ended else stepped
    return max(snap.step - 1, 0)

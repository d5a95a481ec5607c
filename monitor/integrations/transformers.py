"""Hugging Face ``transformers.Trainer`` callback: a Monitor attached for the length of ``train``.

>>> from monitor.integrations.transformers import RepwatchCallback
>>> cb = RepwatchCallback(layers=["bert.encoder.layer.1"], run="ft", every=10, port=9400)  # doctest: +SKIP
>>> Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()         # doctest: +SKIP

Checkpoints: ``Trainer`` saves a callback's state only through ``ExportableState``, as JSON in
``trainer_state.json``, and restores it by calling the callback's constructor again with JSON
arguments (and only with ``restore_callback_states_from_checkpoint=True``). A Monitor's state is
tensors (windows of rows) and the constructor takes modules, so this callback writes the state
beside the checkpoint instead: ``checkpoint-<step>/repwatch_monitor.pt`` (``..._rank<i>.pt`` on
the other processes), and on ``train(resume_from_checkpoint=...)`` loads it from
``<output_dir>/checkpoint-<step>`` (or from ``resume_from=``).

Logging: ``Trainer.log`` hands one ``logs`` dict to every callback's ``on_log`` in the order of
the Trainer's callback list, where the ``report_to`` integrations (TensorBoard, W&B, MLflow, ...)
come before the callbacks passed in ``callbacks=``; a key added by a later callback never reaches
them. So this callback moves itself to the front of that list when training begins, and its
``on_log`` adds the scalars of a publish not yet logged to ``logs``. (``state.log_history`` is
appended before ``on_log`` runs: it never holds them.)
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import CallbackHandler
except ImportError:
    raise ImportError("monitor.integrations.transformers needs Hugging Face transformers: "
                      "pip install transformers") from None

from monitor.integrations._attach import (Layer, attach, check_activations, check_layers,
                                          check_monitor_kwargs, check_port, publish_pending)
from monitor.loggers import scalars
from monitor.monitor import Monitor

log = logging.getLogger("repwatch")


def state_file(process_index: int) -> str:
    """File name of one process's Monitor state inside a checkpoint directory."""
    return "repwatch_monitor.pt" if process_index == 0 else f"repwatch_monitor_rank{process_index}.pt"


class RepwatchCallback(TrainerCallback):
    """Watch ``layers`` of the Trainer's model while it trains.

    On train begin a Monitor is created (``run``, ``every``, ``port`` and ``**monitor_kwargs``
    go to :class:`~monitor.monitor.Monitor`) and each of ``layers`` (a submodule path such as
    ``"bert.encoder"`` or the module itself) is watched; ``activations`` (True or module
    names) adds plasticity tracking. The monitor steps once per optimizer step
    (``state.global_step``) and closes at train end. Only the world main process
    (``state.is_world_process_zero``) serves ``port``. Its state is saved with each checkpoint
    and restored on resume (see the module docstring); ``resume_from`` names a checkpoint
    directory explicitly. Hooks return None: the callback never changes ``control``.

    Each publish's scalars (:func:`monitor.loggers.scalars`: ``repwatch/<stream>/<signal>``,
    ...) are added to the next ``logs`` the Trainer logs (``on_log``), so every ``report_to``
    destination records them at that log's step (``log_scalars=False``: not added). The last
    step publishes what is pending before the Trainer's final log; at train end, steps still
    pending (training stopped early) are published, too late for ``logs``.

    ``callback.monitor`` is the Monitor of the latest ``train`` (kept after close).
    """

    def __init__(self, layers: Sequence[Layer] | None = None, *,
                 activations: bool | Sequence[str] = False, run: str = "default",
                 every: int = 10, port: int | None = None,
                 resume_from: str | os.PathLike[str] | None = None, log_scalars: bool = True,
                 **monitor_kwargs: Any) -> None:
        self.layers = check_layers(layers)
        self.activations = check_activations(activations)
        if not self.layers and not self.activations:
            raise ValueError("RepwatchCallback needs layers=[...] and/or activations=")
        self.port = check_port(port)
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.log_scalars = bool(log_scalars)
        self.monitor_kwargs = {"run": run, "every": every, **monitor_kwargs}
        check_monitor_kwargs(self.monitor_kwargs)   # bad arguments fail here, not later
        self.monitor: Monitor | None = None
        self._last_global_step = 0
        self._unlogged: dict[str, float] | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: torch.nn.Module | None = None,
                       **kwargs: Any) -> None:
        if model is None:
            raise ValueError("RepwatchCallback needs the Trainer's model (got model=None)")
        if self.monitor is not None:
            self.monitor.close()
        self.monitor = attach(model, self.layers, self.activations,
                              serve=bool(state.is_world_process_zero), port=self.port,
                              monitor_kwargs=self.monitor_kwargs)
        self._last_global_step = int(state.global_step)
        self._unlogged = None
        if self.log_scalars:
            self._run_first()
        if state.global_step > 0 or self.resume_from is not None:      # resuming
            folder = self.resume_from or Path(args.output_dir) / f"checkpoint-{state.global_step}"
            path = folder / state_file(int(args.process_index))
            if path.is_file():
                self.monitor.load_state_dict(torch.load(path, map_location="cpu",
                                                        weights_only=False))
            else:
                log.warning("repwatch: no monitor state at %s; the monitor starts afresh", path)
        return None

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        if self.monitor is None:
            return None
        done = int(state.global_step) - self._last_global_step
        snap = None
        if done > 0:
            self._last_global_step += done
            snap = self.monitor.step(done)
        if 0 < state.max_steps <= state.global_step:     # the last step: before the last log
            snap = publish_pending(self.monitor) or snap
        if snap is not None and self.log_scalars:
            self._unlogged = scalars(snap)
        return None

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is not None and self._unlogged:
            logs.update(self._unlogged)
            self._unlogged = None
        return None

    def _run_first(self) -> None:
        """Move this callback to the front of the Trainer's callback list (the
        ``CallbackHandler`` whose ``on_train_begin`` calls this one), so that its ``on_log``
        runs before the ``report_to`` integrations'. The handler is iterating that list: moving
        this callback from its index to 0 leaves every later callback at its index, so none is
        skipped or called twice."""
        frame = inspect.currentframe()
        try:
            caller = frame.f_back if frame is not None else None
            for _ in range(8):
                if caller is None:
                    break
                handler = caller.f_locals.get("self")
                if isinstance(handler, CallbackHandler):
                    callbacks = handler.callbacks
                    for i, cb in enumerate(callbacks):
                        if cb is self:
                            if i:
                                del callbacks[i]
                                callbacks.insert(0, self)
                            return
                caller = caller.f_back
        finally:
            del frame
        log.warning("repwatch: the Trainer's callback list was not found; report_to "
                    "destinations that come before RepwatchCallback will not get repwatch's "
                    "scalars (put it first: trainer.callback_handler.callbacks.insert(0, cb))")

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if self.monitor is None:
            return None
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            torch.save(self.monitor.state_dict(), folder / state_file(int(args.process_index)))
        else:
            log.warning("repwatch: checkpoint folder %s not found; monitor state not saved",
                        folder)
        return None

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()       # publishes the steps still pending (training stopped early)
        return None

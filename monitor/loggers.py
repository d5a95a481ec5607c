"""repwatch's numbers beside the loss curves: publish sinks for TensorBoard, Weights & Biases and
MLflow.

Each sink is a callable of one :class:`~monitor.snapshot.Snapshot`, so it can be called with
what :meth:`Monitor.step <monitor.monitor.Monitor.step>` returns or registered as a publish
callback::

    from monitor.loggers import TensorBoard
    tb = TensorBoard("runs/exp1")              # or TensorBoard(writer=my_summary_writer)
    ...
    snap = mon.step()
    if snap is not None:
        tb(snap)
    tb.close()

Every sink logs :func:`scalars` of the snapshot at the snapshot's step. Each library is optional
and imported when its sink is made (``pip install 'repwatch[loggers]'`` installs all three): a
missing one is an ImportError naming the package to install. Framework users need none of this:
the Lightning callback logs through ``trainer.loggers`` and the ``transformers`` callback
through the Trainer's ``report_to`` destinations (:mod:`monitor.integrations`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from typing import Any

from monitor.snapshot import SignalKey, Snapshot

PREFIX = "repwatch"
"""First segment of every scalar's name."""

__all__ = ["MLflow", "PREFIX", "TensorBoard", "WandB", "scalars"]


def _name(key: str) -> str:
    """A signal key as a path segment: ``dormant_units_ratio{tau=0.1}`` →
    ``dormant_units_ratio/tau_0.1`` (no braces or ``=``, which MLflow refuses)."""
    sk = SignalKey.parse(key)
    return "/".join([sk.signal, *(f"{k}_{v}" for k, v in sk.labels)])


def scalars(snapshot: Snapshot, prefix: str = PREFIX) -> dict[str, float]:
    """The snapshot's finite values by name (NaN and ±inf are left out, as on ``/metrics``):

    * a stream's signals as ``<prefix>/<stream>/<signal>`` (``repwatch/encoder/effective_rank``);
    * an activation layer's as ``<prefix>/layer/<layer>/<signal>``, a parameter's as
      ``<prefix>/param/<param>/<signal>``, the model's (early-bird, NC1 depth) as
      ``<prefix>/run/<signal>``; a labelled signal adds its labels as ``/<label>_<value>``
      (``repwatch/layer/fc1/dormant_units_ratio/tau_0.1``);
    * ``<prefix>/alerts_firing``: how many alerts fire.
    """
    out: dict[str, float] = {}

    def put(path: str, values: dict[str, float]) -> None:
        for key, value in sorted(values.items()):
            v = float(value)
            if math.isfinite(v):
                out[f"{path}/{_name(key)}"] = v

    for stream, values in sorted(snapshot.streams.items()):
        put(f"{prefix}/{stream}", values)
    for layer, values in sorted(snapshot.layers.items()):
        put(f"{prefix}/layer/{layer}", values)
    for param, values in sorted(snapshot.params.items()):
        put(f"{prefix}/param/{param}", values)
    put(f"{prefix}/run", snapshot.run_signals)
    out[f"{prefix}/alerts_firing"] = float(len(snapshot.alerts))
    return out


def _missing(sink: str, package: str, exc: ImportError) -> ImportError:
    return ImportError(f"monitor.loggers.{sink} needs {package}: pip install {package}  (or pip "
                       f"install 'repwatch[loggers]' for TensorBoard, W&B and MLflow) [{exc}]")


class _Sink:
    """Shared by the sinks: a context manager that closes what it opened."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TensorBoard(_Sink):
    """Scalars to TensorBoard event files through ``torch.utils.tensorboard.SummaryWriter``
    (needs the ``tensorboard`` package).

    ``log_dir``: where a new writer writes (``SummaryWriter``'s default ``runs/...`` when None);
    or ``writer``: an open writer (``SummaryWriter``, tensorboardX's, Lightning's
    ``TensorBoardLogger.experiment``: anything with ``add_scalar(tag, value, global_step,
    walltime)``), so the curves land beside the user's own; it stays open at :meth:`close`.
    ``flush``: flush after each snapshot (else the writer's ``flush_secs``, 120 s by default).
    """

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, *, writer: Any = None,
                 prefix: str = PREFIX, flush: bool = True) -> None:
        if writer is not None and log_dir is not None:
            raise TypeError("TensorBoard takes log_dir or writer, not both")
        self.prefix = prefix
        self.flush = bool(flush)
        self._owned = writer is None
        if writer is None:
            try:
                import tensorboard  # noqa: F401  - what torch.utils.tensorboard writes with
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise _missing("TensorBoard", "tensorboard", exc) from None
            writer = SummaryWriter(log_dir=None if log_dir is None else os.fspath(log_dir))
        self.writer = writer

    def __call__(self, snapshot: Snapshot) -> None:
        for tag, value in scalars(snapshot, self.prefix).items():
            self.writer.add_scalar(tag, value, global_step=snapshot.step, walltime=snapshot.time)
        if self.flush:
            self.writer.flush()

    def close(self) -> None:
        """Flush; close the writer if this sink made it."""
        if self._owned:
            self.writer.close()
        else:
            self.writer.flush()


class WandB(_Sink):
    """Scalars to a Weights & Biases run (needs ``wandb``).

    ``run``: the run to log to; None: the active run (``wandb.run``), else a new run started
    with ``wandb.init(**init_kwargs)`` (e.g. ``project=``, ``mode="offline"``) and finished at
    :meth:`close`. Each snapshot is one ``run.log`` call holding ``<prefix>/step`` (the
    monitor's step), declared the step metric of ``<prefix>/*``
    (``define_metric``): repwatch's curves are plotted against the training step however often
    the run logs otherwise. (A run that logs with an explicit ``wandb.log(..., step=N)`` must
    not be shared: each sink call advances W&B's own step.)
    """

    def __init__(self, run: Any = None, *, prefix: str = PREFIX, **init_kwargs: Any) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise _missing("WandB", "wandb", exc) from None
        if run is not None and init_kwargs:
            raise TypeError("WandB: wandb.init arguments given with an existing run "
                            f"({sorted(init_kwargs)})")
        if run is None and not init_kwargs:
            run = wandb.run
        self._owned = run is None
        self.run = wandb.init(**init_kwargs) if run is None else run
        self.prefix = prefix
        self.run.define_metric(f"{prefix}/step")
        self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")

    def __call__(self, snapshot: Snapshot) -> None:
        data: dict[str, float] = {f"{self.prefix}/step": snapshot.step}
        data.update(scalars(snapshot, self.prefix))
        self.run.log(data)

    def close(self) -> None:
        """Finish the run if this sink started it."""
        if self._owned:
            self.run.finish()


_MLFLOW_REFUSED = re.compile(r"[^\w.\- :/]")
"""Characters MLflow refuses in a metric name (it takes alphanumerics, ``_ - . space : /``)."""
_MLFLOW_BATCH = 1000
"""MLflow's cap on metrics per ``log_batch`` call."""


class MLflow(_Sink):
    """Scalars to an MLflow run (needs ``mlflow`` or ``mlflow-skinny``).

    ``run_id``: the run to log to; None: the active run (``mlflow.active_run()``), else a new
    run in ``experiment`` (a name; MLflow's default experiment when None) named ``run_name``,
    ended at :meth:`close`. ``tracking_uri``: where (MLflow's default when None: the
    ``MLFLOW_TRACKING_URI`` environment variable or ``mlflow.set_tracking_uri``). Each
    snapshot is one ``log_batch`` (per 1000 metrics) at the snapshot's step and time; characters
    MLflow refuses in names become ``_``.
    """

    def __init__(self, run_id: str | None = None, *, tracking_uri: str | None = None,
                 experiment: str | None = None, run_name: str | None = None,
                 prefix: str = PREFIX) -> None:
        try:
            import mlflow
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise _missing("MLflow", "mlflow", exc) from None
        self._metric = Metric
        self.client = MlflowClient(tracking_uri)
        self.prefix = prefix
        if run_id is None and experiment is None and run_name is None:
            active = mlflow.active_run()
            run_id = active.info.run_id if active is not None else None
        self._owned = run_id is None
        if run_id is None:
            experiment_id = "0"
            if experiment is not None:
                found = self.client.get_experiment_by_name(experiment)
                experiment_id = (found.experiment_id if found is not None
                                 else self.client.create_experiment(experiment))
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.run_id: str = run_id

    def _metrics(self, snapshot: Snapshot) -> Iterator[Any]:
        stamp = int(round(snapshot.time * 1000))
        for key, value in scalars(snapshot, self.prefix).items():
            yield self._metric(_MLFLOW_REFUSED.sub("_", key), value, stamp, snapshot.step)

    def __call__(self, snapshot: Snapshot) -> None:
        metrics = list(self._metrics(snapshot))
        for start in range(0, len(metrics), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + _MLFLOW_BATCH])

    def close(self) -> None:
        """End the run if this sink created it."""
        if self._owned:
            self.client.set_terminated(self.run_id)

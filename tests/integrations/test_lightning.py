"""RepwatchCallback on a real (tiny) Lightning training: metrics, steps, checkpoints, no effect."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

pl = pytest.importorskip("lightning.pytorch", reason="Lightning is not installed "
                         "(pip install lightning); the Lightning callback cannot be tested")

from monitor.integrations.lightning import RepwatchCallback  # noqa: E402

pytestmark = pytest.mark.slow                   # trains tiny real models


class TinyModule(pl.LightningModule):
    """20 → 32 (encoder) → 5 classifier with dropout (dropout draws from the global RNG)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(0.1))
        self.head = nn.Linear(32, 5)
        self.losses: list[float] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader(n: int = 512, batch: int = 32) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(n, 20, generator=gen)
    y = torch.randint(0, 5, (n,), generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def trainer(tmp: Path, callbacks: list[Any], max_steps: int, **kw: Any) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp, callbacks=callbacks, **kw)


def fit(tmp: Path, cb: RepwatchCallback | None, max_steps: int = 12, seed: int = 0,
        **kw: Any) -> tuple[TinyModule, pl.Trainer]:
    pl.seed_everything(seed, verbose=False)
    model = TinyModule()
    t = trainer(tmp, [cb] if cb is not None else [], max_steps, **kw)
    t.fit(model, loader())
    return model, t


def test_metrics_for_watched_layers_and_step_count(tmp_path: Path) -> None:
    cb = RepwatchCallback(layers=["encoder"], activations=["encoder.1"], run="lit", every=4,
                          port=None, max_rows=64, window=256)
    model, t = fit(tmp_path, cb, max_steps=12)
    mon = cb.monitor
    assert mon is not None and mon._closed                  # closed at fit end
    assert t.global_step == 12 and mon.step_count == t.global_step
    assert [s.step for s in mon.history] == [4, 8, 12]
    snap = mon.latest
    assert snap is not None
    er = snap.get("effective_rank", stream="encoder")
    assert 1.0 < er <= 32.0
    assert 0.0 <= snap.get("dormant_units_ratio", layer="encoder.1", tau=0.0) <= 1.0
    assert not snap.errors or all(v == 0 for v in snap.errors.values())
    # the hook removed at fit end: more forwards add nothing
    before = mon.publish().get("effective_rank", stream="encoder")
    model(torch.randn(64, 20) * 100)
    assert mon.publish().get("effective_rank", stream="encoder") == before


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path) -> None:
    cb = RepwatchCallback(layers=["encoder"], every=2, port=None, max_rows=64, window=256)
    _, t = fit(tmp_path, cb, max_steps=5, accumulate_grad_batches=3)
    assert t.global_step == 5 and cb.monitor is not None and cb.monitor.step_count == 5


def test_callback_never_changes_training(tmp_path: Path) -> None:
    plain, _ = fit(tmp_path / "a", None, max_steps=10, seed=3)
    cb = RepwatchCallback(layers=["encoder", "head"], activations=True, every=3, port=None,
                          max_rows=16, window=64)
    watched, _ = fit(tmp_path / "b", cb, max_steps=10, seed=3)
    assert len(plain.losses) == 10
    assert watched.losses == plain.losses                  # bit-identical, dropout included
    assert cb.monitor is not None and cb.monitor.step_count == 10
    for name in ("on_fit_start", "on_train_batch_end", "on_fit_end"):
        assert getattr(RepwatchCallback, name) is not getattr(pl.Callback, name)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    cb = RepwatchCallback(layers=["encoder"], run="ckpt", every=4, port=None, max_rows=64,
                          window=256)
    _, t = fit(tmp_path, cb, max_steps=8)
    ckpt = tmp_path / "last.ckpt"
    t.save_checkpoint(ckpt)
    assert cb.monitor is not None
    saved = cb.monitor.latest
    assert saved is not None and saved.step == 8
    stored = torch.load(ckpt, weights_only=False)["callbacks"][cb.state_key]
    assert stored["monitor"]["step"] == 8

    # a new callback and Trainer resume from the checkpoint: the monitor continues at step 8
    cb2 = RepwatchCallback(layers=["encoder"], run="ckpt", every=4, port=None, max_rows=64,
                           window=256)
    pl.seed_everything(0, verbose=False)
    model2 = TinyModule()
    t2 = trainer(tmp_path, [cb2], max_steps=12)
    t2.fit(model2, loader(), ckpt_path=ckpt)
    mon2 = cb2.monitor
    assert mon2 is not None and t2.global_step == 12 and mon2.step_count == 12
    assert [s.step for s in mon2.history] == [12]           # one publish after the resume
    # restored window: right after loading, the monitor's publish equals the saved snapshot
    cb3 = RepwatchCallback(layers=["encoder"], run="ckpt", every=4, port=None, max_rows=64,
                           window=256)
    cb3.load_state_dict(stored)
    assert cb3.monitor is None and cb3.state_dict()["monitor"]["step"] == 8
    cb3.on_fit_start(t2, TinyModule())
    assert cb3.monitor is not None
    restored = cb3.monitor.publish()
    cb3.monitor.close()
    assert restored.step == 8
    assert math.isclose(restored.get("effective_rank", stream="encoder"),
                        saved.get("effective_rank", stream="encoder"), rel_tol=1e-9)


def test_state_is_picklable_and_plain(tmp_path: Path) -> None:
    import pickle

    cb = RepwatchCallback(layers=["encoder"], every=2, port=None, max_rows=32, window=64)
    fit(tmp_path, cb, max_steps=4)
    state = pickle.loads(pickle.dumps(cb.state_dict()))
    assert state["monitor"]["step"] == 4


def test_only_global_rank_zero_serves(tmp_path: Path) -> None:
    class Rank1:
        is_global_zero = False

    class Rank0:
        is_global_zero = True

    cb = RepwatchCallback(layers=["encoder"], port=0)
    cb.on_fit_start(Rank1(), TinyModule())                   # type: ignore[arg-type]
    assert cb.monitor is not None and cb.monitor.url is None
    cb.on_fit_end(Rank1(), TinyModule())                     # type: ignore[arg-type]
    cb.on_fit_start(Rank0(), TinyModule())                   # type: ignore[arg-type]
    try:
        assert cb.monitor.url is not None and cb.monitor.url.startswith("http://127.0.0.1:")
    finally:
        cb.monitor.close()


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="layers"):
        RepwatchCallback()
    with pytest.raises(TypeError, match="layers"):
        RepwatchCallback(layers=[3])                          # type: ignore[list-item]
    with pytest.raises(ValueError, match="every"):
        RepwatchCallback(layers=["encoder"], every=0)
    with pytest.raises(ValueError, match="port"):
        RepwatchCallback(layers=["encoder"], port=70000)
    cb = RepwatchCallback(layers=["nope"], port=None)
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        cb.on_fit_start(type("T", (), {"is_global_zero": True})(), TinyModule())  # type: ignore[arg-type]


class LoggingModule(TinyModule):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


def test_publishes_go_to_the_trainers_loggers(tmp_path: Path) -> None:
    """Every publish's scalars through each of ``trainer.loggers`` (here Lightning's own
    CSVLogger), the final partial cadence published at train end; at the step Lightning logs
    the same batch's ``self.log`` values at (steps done before it: monitor step − 1)."""
    from lightning.pytorch.loggers import CSVLogger

    cb = RepwatchCallback(layers=["encoder"], activations=["encoder.1"], run="lit", every=4,
                          port=None, max_rows=64, window=256)
    pl.seed_everything(0, verbose=False)
    csv_logger = CSVLogger(tmp_path, name="csv", version=0)
    t = pl.Trainer(max_steps=10, accelerator="cpu", devices=1, logger=csv_logger,
                   log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, callbacks=[cb])
    t.fit(LoggingModule(), loader())
    mon = cb.monitor
    assert mon is not None and [s.step for s in mon.history] == [4, 8, 10]
    import csv

    with (tmp_path / "csv" / "version_0" / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    key = "repwatch/encoder/effective_rank"
    logged = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    assert [s for s, _ in logged] == [3, 7, 9]
    loss_steps = [int(r["step"]) for r in rows if r.get("train_loss")]
    assert loss_steps == list(range(10))                 # Lightning's own: batch i at step i
    for (_, value), snap in zip(logged, mon.history, strict=True):
        assert value == pytest.approx(snap.get("effective_rank", stream="encoder"))
    assert any(r.get("repwatch/layer/encoder.1/dormant_units_ratio/tau_0") for r in rows)


def test_no_logger_no_logging(tmp_path: Path) -> None:
    """``logger=False`` (the other tests) and ``log_scalars=False``: nothing is logged."""
    class Recorder(pl.loggers.Logger):
        calls: list[dict[str, float]] = []

        @property
        def name(self) -> str:
            return "rec"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.calls.append(dict(metrics))

    rec = Recorder()
    cb = RepwatchCallback(layers=["encoder"], every=2, port=None, max_rows=32, window=64,
                          log_scalars=False)
    t = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=rec, log_every_n_steps=1,
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, callbacks=[cb])
    t.fit(TinyModule(), loader())
    assert not any(k.startswith("repwatch/") for c in rec.calls for k in c)

"""monitor.loggers: repwatch's scalars to TensorBoard, Weights & Biases and MLflow, each with the
real library in an offline mode, read back from what it wrote."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

import monitor.loggers as loggers
from monitor.snapshot import Alert, SignalKey, Snapshot


def _snap(step: int, rank: float = 3.5) -> Snapshot:
    alert = Alert(name="RepwatchRepresentationCollapse", stream="enc", severity="critical",
                  value=0.01, signal="embedding_std_ratio", summary="s", description="d",
                  runbook_url="x", run="r")
    return Snapshot(run="r", step=step, time=1_700_000_000.0 + step,
                    streams={"enc": {"effective_rank": rank, "spectrum_alpha": math.nan,
                                     "window_samples": 64.0}},
                    layers={"encoder.1": {SignalKey.of("dormant_units_ratio", tau=0.1): 0.25,
                                          "effective_rank": 7.0}},
                    params={"fc.weight": {"weight_norm": 2.0}},
                    run_signals={SignalKey.of("earlybird_mask_distance", sparsity=0.5): 0.05},
                    alerts=[alert] if step > 4 else [])


EXPECTED = {
    "repwatch/enc/effective_rank": 3.5,
    "repwatch/enc/window_samples": 64.0,
    "repwatch/layer/encoder.1/dormant_units_ratio/tau_0.1": 0.25,
    "repwatch/layer/encoder.1/effective_rank": 7.0,
    "repwatch/param/fc.weight/weight_norm": 2.0,
    "repwatch/run/earlybird_mask_distance/sparsity_0.5": 0.05,
    "repwatch/alerts_firing": 0.0,
}


def test_scalars_names_and_values() -> None:
    assert loggers.scalars(_snap(4)) == EXPECTED        # NaN left out
    assert loggers.scalars(_snap(8))["repwatch/alerts_firing"] == 1.0
    assert set(loggers.scalars(_snap(4), prefix="rw")) == {
        "rw" + k.removeprefix("repwatch") for k in EXPECTED}


# ------------------------------------------------------------------------------ TensorBoard

def _tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    tb = loggers.TensorBoard(tmp_path / "tb")
    tb(_snap(4))
    tb(_snap(8, rank=2.5))
    tb.close()
    got = _tensorboard_scalars(tmp_path / "tb")
    assert set(got) == set(EXPECTED)
    assert [(s, pytest.approx(v)) for s, v in got["repwatch/enc/effective_rank"]] == [
        (4, 3.5), (8, 2.5)]
    assert got["repwatch/alerts_firing"] == [(4, 0.0), (8, 1.0)]


def test_tensorboard_on_the_users_writer(tmp_path: Path) -> None:
    """An existing SummaryWriter: repwatch's curves beside the user's loss, writer left open."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path / "run")
    writer.add_scalar("loss", 1.0, 4)
    with loggers.TensorBoard(writer=writer) as tb:
        tb(_snap(4))
    writer.add_scalar("loss", 0.5, 8)                     # still open after the logger closed
    writer.close()
    got = _tensorboard_scalars(tmp_path / "run")
    assert got["loss"] == [(4, 1.0), (8, 0.5)]
    assert got["repwatch/layer/encoder.1/effective_rank"] == [(4, 7.0)]


# ------------------------------------------------------------------------------ W&B

def _wandb_history(root: Path) -> list[dict[str, Any]]:
    """History rows of the offline run under ``root`` (its .wandb file: a LevelDB-format log of
    protobuf Records after a 7-byte W&B header), once W&B's service has written it all
    (``finish()`` returns before its writer has: ``teardown()`` waits for the service)."""
    import wandb
    from wandb.proto import wandb_internal_pb2 as pb

    wandb.teardown()

    (path,) = root.glob("wandb/offline-run-*/run-*.wandb")
    data, block, pos, buf, rows = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        buf += data[pos:pos + length]
        pos += length
        if kind in (1, 4):                                # FULL or LAST
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                             for i in record.history.item})
    return rows


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    return tmp_path


@pytest.mark.slow                       # starts W&B's service (wandb-core) in offline mode
def test_wandb_offline_run(wandb_offline: Path) -> None:
    import wandb

    run = wandb.init(mode="offline", project="repwatch-test", dir=str(wandb_offline))
    try:
        run.log({"loss": 1.0})
        wb = loggers.WandB(run)
        wb(_snap(4))
        run.log({"loss": 0.5})
        wb(_snap(8, rank=2.5))
        wb.close()                                        # not its run: stays open
        run.log({"loss": 0.25})
    finally:
        run.finish()
    rows = _wandb_history(wandb_offline)
    ours = [r for r in rows if "repwatch/step" in r]
    assert [r["repwatch/step"] for r in ours] == [4, 8]
    assert [r["repwatch/enc/effective_rank"] for r in ours] == [3.5, 2.5]
    assert {k for k in ours[0] if not k.startswith("_")} == set(EXPECTED) | {"repwatch/step"}
    assert [r["loss"] for r in rows if "loss" in r] == [1.0, 0.5, 0.25]   # the user's rows kept


@pytest.mark.slow
def test_wandb_starts_and_finishes_its_own_run(wandb_offline: Path) -> None:
    import wandb

    wb = loggers.WandB(project="repwatch-test", mode="offline", dir=str(wandb_offline))
    assert wandb.run is wb.run
    wb(_snap(4))
    wb.close()
    assert wandb.run is None
    rows = _wandb_history(wandb_offline)
    assert [r["repwatch/layer/encoder.1/dormant_units_ratio/tau_0.1"] for r in rows] == [0.25]


# ------------------------------------------------------------------------------ MLflow

@pytest.fixture
def mlflow_file_store(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    # MLflow 3 refuses its file store (maintenance mode) unless allowed
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


@pytest.mark.slow                       # importing mlflow takes seconds
@pytest.mark.usefixtures("mlflow_file_store")
def test_mlflow_file_store(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    ml = loggers.MLflow(tracking_uri=uri, experiment="repwatch-test", run_name="r")
    ml(_snap(4))
    ml(_snap(8, rank=2.5))
    ml.close()
    client = MlflowClient(uri)
    run = client.get_run(ml.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert set(run.data.metrics) == set(EXPECTED)
    hist = client.get_metric_history(ml.run_id, "repwatch/enc/effective_rank")
    assert sorted((m.step, m.value) for m in hist) == [(4, 3.5), (8, 2.5)]
    assert {m.timestamp for m in hist} == {1_700_000_004_000, 1_700_000_008_000}


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_file_store")
def test_mlflow_logs_into_the_active_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with mlflow.start_run() as active:
        mlflow.log_metric("loss", 1.0, step=4)
        ml = loggers.MLflow()
        assert ml.run_id == active.info.run_id
        ml(_snap(4))
        ml.close()                                        # not its run: left running
        assert mlflow.active_run() is not None
    metrics = MlflowClient(uri).get_run(active.info.run_id).data.metrics
    assert metrics["loss"] == 1.0 and metrics["repwatch/param/fc.weight/weight_norm"] == 2.0


# ------------------------------------------------------------------------------ missing libraries

@pytest.mark.parametrize(("cls", "modules", "package"), [
    ("TensorBoard", ["torch.utils.tensorboard", "tensorboard"], "tensorboard"),
    ("WandB", ["wandb"], "wandb"),
    ("MLflow", ["mlflow", "mlflow.tracking", "mlflow.entities"], "mlflow"),
])
def test_missing_library_is_a_clear_error(cls: str, modules: list[str], package: str,
                                          monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)     # import raises ImportError
    with pytest.raises(ImportError, match=rf"pip install .*{package}.*repwatch\[loggers\]"):
        getattr(loggers, cls)(tmp_path / "x") if cls == "TensorBoard" else getattr(loggers, cls)()


def test_usable_as_publish_callbacks() -> None:
    """Each sink is a callable of one Snapshot (what ``Monitor.on_publish`` would call)."""
    seen: list[dict[str, float]] = []

    class Writer:
        def add_scalar(self, tag: str, value: float, global_step: int, walltime: float) -> None:
            seen.append({tag: value})

        def flush(self) -> None:
            pass

    tb = loggers.TensorBoard(writer=Writer())
    tb(_snap(4))
    assert {k: v for d in seen for k, v in d.items()} == EXPECTED


def test_on_publish_calls_a_sink_after_every_publish_and_counts_its_errors() -> None:
    import torch

    from monitor import Monitor

    seen: list[int] = []

    def broken(snap: Any) -> None:
        raise RuntimeError("logger down")

    with Monitor(run="r", every=2, window=64, max_rows=64, port=None) as mon:
        mon.on_publish(lambda snap: seen.append(snap.step))
        mon.on_publish(broken)
        gen = torch.Generator().manual_seed(0)
        for _ in range(6):
            mon.observe("s", torch.randn(8, 4, generator=gen))
            mon.step()
        assert seen == [2, 4, 6]
        assert mon.latest is not None and mon.latest.errors.get("callback", 0) >= 2
    with pytest.raises(TypeError, match="callable"):
        Monitor(port=None).on_publish(3)  # type: ignore[arg-type]

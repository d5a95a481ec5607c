"""ONNX Runtime backend: same values and alerts as the torch backend, and no torch needed."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from monitor.scorers.neural_collapse import NeuralCollapseScorer  # noqa: E402
from monitor.sidecar.onnx_backend import OnnxBackend  # noqa: E402
from monitor.sidecar.service import SidecarConfig, TorchBackend  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _batches(collapse_after: int | None = None) -> list[tuple[str, np.ndarray, int]]:
    rng = np.random.default_rng(3)
    mix = rng.standard_normal((24, 24)).astype(np.float32)
    out = []
    for step in range(1, 41):
        z = np.maximum(rng.standard_normal((128, 24)).astype(np.float32) @ mix, 0)
        if collapse_after is not None and step > collapse_after:
            z = np.ones((128, 24), np.float32) + 1e-4 * rng.standard_normal((128, 24)).astype(np.float32)
        if step == 5:
            z[0, 0] = np.nan                                  # a non-finite row
        out.append(("enc", z, step))
    return out


def _run(backend_cls: type, batches: list[tuple[str, np.ndarray, int]]):  # type: ignore[no-untyped-def]
    config = SidecarConfig(every=10, window=1024, device="cpu",
                           monitor_options={"peak_warmup": 10})
    backend = backend_cls(config)
    for stream, rows, step in batches:
        backend.ingest("r", stream, rows, None, step)
    backend.ingest("r", "enc", batches[-1][1], None, 50)     # publish at step 50
    snaps = backend.history("r")
    backend.close()
    return snaps


def test_values_match_the_torch_backend() -> None:
    onnx, torch_ = _run(OnnxBackend, _batches()), _run(TorchBackend, _batches())
    assert [s.step for s in onnx] == [s.step for s in torch_] == [10, 20, 30, 40, 50]
    for a, b in zip(onnx, torch_, strict=True):
        va, vb = a.streams["enc"], b.streams["enc"]
        for key, ref in vb.items():
            if key not in va:
                continue
            if math.isnan(ref):
                assert math.isnan(va[key]), key
            else:
                assert va[key] == pytest.approx(ref, rel=1e-6, abs=1e-9), (a.step, key)
        shared = set(va) & set(vb)
        assert {"effective_rank", "embedding_std_ratio", "low_quality_samples_ratio",
                "qscore_threshold", "effective_rank_peak_ratio"} <= shared
        # the same names (spectral_sketch_dim: 0 on the exact path), AUPRC aside (no predictions
        # reach the ONNX backend); sketched streams: tests/sidecar/test_onnx_sketch.py
        assert set(va) == set(vb) - {"qscore_auprc", "qscore_misclassified_ratio"}
        assert va["spectral_sketch_dim"] == 0.0
        assert a.counters["enc"] == b.counters["enc"]
        ha, hb = a.histograms["qscore"]["enc"], b.histograms["qscore"]["enc"]
        assert ha.cumulative == hb.cumulative and ha.count == hb.count
        assert ha.sum == pytest.approx(hb.sum, rel=1e-9)


def test_collapse_alert_fires_like_the_torch_backend() -> None:
    names = []
    for cls in (OnnxBackend, TorchBackend):
        snaps = _run(cls, _batches(collapse_after=15))
        names.append([sorted(a.name for a in s.alerts) for s in snaps])
    assert names[0] == names[1]
    assert "RepwatchRepresentationCollapse" in names[0][-1]


@pytest.mark.e2e
def test_backend_runs_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\n"
            "from monitor.sidecar.service import SidecarConfig\n"
            "from monitor.sidecar.onnx_backend import OnnxBackend\n"
            "b = OnnxBackend(SidecarConfig(backend='torch', every=1, window=64, device='cpu'))\n"
            "b.ingest('r', 's', np.random.rand(32, 8).astype(np.float32), None, 1)\n"
            "b.ingest('r', 's', np.random.rand(32, 8).astype(np.float32), np.arange(32) % 3, 2)\n"
            "b.ingest('r', 's', np.random.rand(32, 8).astype(np.float32), None, 3)\n"
            "snap = b.snapshots()[0]\n"
            "assert snap.streams['s']['window_samples'] == 64, snap.streams\n"
            "assert snap.streams['s']['neural_collapse_classes'] == 3, snap.streams\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- labels (NC)

NC_KEYS = tuple(k for k in NeuralCollapseScorer.signals
                if k not in ("neural_collapse_nc3", "neural_collapse_nc4"))
"""What the torch scorer exports without a classifier (the sidecar never has one)."""

Labelled = tuple[str, np.ndarray, "np.ndarray | None", int]


def _replay(backend_cls: type, batches: list[Labelled], window: int, every: int,
            **options: object) -> list:  # type: ignore[type-arg]
    config = SidecarConfig(every=every, window=window, device="cpu",
                           monitor_options={"peak_warmup": 10, **options})
    backend = backend_cls(config)
    for stream, rows, labels, step in batches:
        backend.ingest("r", stream, rows, labels, step)
    stream, rows, labels, step = batches[-1]
    backend.ingest("r", stream, rows, labels, step + every)       # publish the last steps
    snaps = backend.history("r")
    backend.close()
    return snaps


def _assert_nc_match(onnx: list, torch_: list) -> int:  # type: ignore[type-arg]
    """Same publishes, same NC keys per stream, same values; returns how many were finite."""
    assert [s.step for s in onnx] == [s.step for s in torch_]
    finite = 0
    for a, b in zip(onnx, torch_, strict=True):
        assert set(a.streams) == set(b.streams)
        for name, vb in b.streams.items():
            va = a.streams[name]
            assert {k for k in NC_KEYS if k in va} == {k for k in NC_KEYS if k in vb}, name
            for key in NC_KEYS:
                if key not in vb:
                    continue
                if math.isnan(vb[key]):
                    assert math.isnan(va[key]), (a.step, name, key, va[key])
                else:
                    finite += 1
                    assert va[key] == pytest.approx(vb[key], rel=1e-9, abs=1e-12), \
                        (a.step, name, key, va[key], vb[key])
        ra, rb = a.run_signals, b.run_signals
        assert set(ra) == set(rb), (a.step, ra, rb)
        for key, ref in rb.items():
            assert (math.isnan(ra[key]) and math.isnan(ref)) or ra[key] == ref, (a.step, key)
    return finite


def _separating(steps: int, *, classes: int = 6, dim: int = 16, b: int = 64, seed: int = 5,
                stream: str = "feat", noise: float = 1.0,
                unlabelled: tuple[int, ...] = ()) -> list[Labelled]:
    """Class means that move apart over the steps (NC1 falls); a few rows with labels out of
    range and a non-finite row; the steps in ``unlabelled`` come without labels."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, dim))
    out: list[Labelled] = []
    for step in range(1, steps + 1):
        y = rng.integers(0, classes, b)
        x = (means[y] * (3.0 * step / steps) + noise * rng.standard_normal((b, dim))
             ).astype(np.float32)
        y[:2] = (-1, classes)                         # out of [0, max_classes)
        x[3, 1] = np.inf                              # non-finite, in range
        x[0, 0] = np.nan                              # non-finite and out of range
        out.append((stream, x, None if step in unlabelled else y.astype(np.int64), step))
    return out


def test_labelled_stream_matches_the_torch_backend() -> None:
    batches = _separating(20)
    onnx = _replay(OnnxBackend, batches, window=256, every=4, max_classes=6)
    torch_ = _replay(TorchBackend, batches, window=256, every=4, max_classes=6)
    assert _assert_nc_match(onnx, torch_) > 30
    last = onnx[-1].streams["feat"]
    assert last["labels_out_of_range"] == 2 * 20    # the publish comes before its batch
    assert last["nonfinite_rows"] == 20             # the NaN row is out of range: not counted
    assert last["neural_collapse_classes"] == 6
    assert last["neural_collapse_window_samples"] == 256 - 4 * 3   # 4 batches of 61 valid
    assert onnx[-1].run_signals["neural_collapse_effective_depth"] == 1.0  # NC1 < 0.1 at last
    nc1 = [s.streams["feat"]["neural_collapse_nc1"] for s in onnx]
    assert nc1[-1] < 0.2 * nc1[0]


@pytest.mark.parametrize("unlabelled", [
    (1, 2, 3),                          # rows before the first labels: not in the NC window
    (9, 10, 11, 12, 17),                # labels stop and resume: the window keeps old labels
    (4, 6, 8, 10, 12, 14, 16, 18, 20),  # alternating, small window: labelled rows only
], ids=["unlabelled first", "gaps", "alternating"])
def test_mixed_labelled_and_unlabelled_batches(unlabelled: tuple[int, ...]) -> None:
    batches = _separating(21, unlabelled=unlabelled)
    onnx = _replay(OnnxBackend, batches, window=192, every=2, max_classes=6)
    torch_ = _replay(TorchBackend, batches, window=192, every=2, max_classes=6)
    assert _assert_nc_match(onnx, torch_) > 30


def test_effective_depth_and_unlabelled_streams() -> None:
    """Three streams in this order: unlabelled, noisy (NC1 high), separated (NC1 low)."""
    plain = [(s, x, None, t) for s, x, _, t in _separating(12, stream="plain", seed=1)]
    noisy = _separating(12, stream="noisy", noise=4.0, seed=2)
    sharp = _separating(12, stream="sharp", noise=0.05, seed=3)
    batches = [b for trio in zip(plain, noisy, sharp, strict=True) for b in trio]
    onnx = _replay(OnnxBackend, batches, window=256, every=3, max_classes=6)
    torch_ = _replay(TorchBackend, batches, window=256, every=3, max_classes=6)
    _assert_nc_match(onnx, torch_)
    assert not any(k in onnx[-1].streams["plain"] for k in NC_KEYS)
    assert onnx[-1].run_signals["neural_collapse_effective_depth"] == 2.0


def test_bad_labels_are_refused_like_the_torch_backend() -> None:
    rows = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    for cls in (OnnxBackend, TorchBackend):
        backend = cls(SidecarConfig(every=1, window=64, device="cpu"))
        with pytest.raises(ValueError, match="shape"):
            backend.ingest("r", "s", rows, np.zeros(7, np.int64), 1)
        with pytest.raises(TypeError, match="integer"):
            backend.ingest("r", "s", rows, np.zeros(8, np.float32), 1)
        backend.close()
    with pytest.raises(ValueError, match="max_classes"):
        OnnxBackend(SidecarConfig(device="cpu", monitor_options={"max_classes": 1}))


@pytest.mark.slow
def test_digits_classifier_nc1_falls_in_both_backends() -> None:
    """A small MLP trained on scikit-learn digits: the penultimate features of a fixed set of
    training images (current model, each epoch) collapse onto their class means."""
    import warnings

    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    probe, probe_y = x[:512], y[:512].astype(np.int64)
    clf = MLPClassifier(hidden_layer_sizes=(32, 32), learning_rate_init=0.01, alpha=0.0,
                        batch_size=64, random_state=0)
    batches: list[Labelled] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for epoch in range(1, 41):
            clf.partial_fit(x, y, classes=np.arange(10))
            h = probe
            for w, b in zip(clf.coefs_[:-1], clf.intercepts_[:-1], strict=True):
                h = np.maximum(h @ w + b, 0.0)            # ReLU hidden layers: (512, 32)
            batches.append(("penultimate", h.astype(np.float32), probe_y, epoch))
    # window = one probe pass: each publish scores one model's features (Papyan's protocol).
    onnx = _replay(OnnxBackend, batches, window=512, every=2, max_classes=10)
    torch_ = _replay(TorchBackend, batches, window=512, every=2, max_classes=10)
    assert _assert_nc_match(onnx, torch_) > 20 * 6
    nc1 = [s.streams["penultimate"]["neural_collapse_nc1"] for s in onnx]
    assert nc1[-1] < 0.5 * nc1[0], nc1


def test_labels_over_http_reach_metrics() -> None:
    """Labelled batches POSTed to the service (ONNX backend) give NC gauges on /metrics."""
    from fastapi.testclient import TestClient

    from monitor.transport.wire import encode_batch
    from monitor.sidecar.service import Sidecar, create_sidecar_app

    config = SidecarConfig(backend="onnx", every=1, window=512, device="cpu",
                           monitor_options={"max_classes": 6})
    sc = Sidecar(config)
    try:
        client = TestClient(create_sidecar_app(config, sc))
        for stream, rows, labels, step in _separating(3):
            headers, body = encode_batch(rows, labels=labels, step=step)
            r = client.post(f"/v1/runs/r/streams/{stream}/batches", headers=headers, content=body)
            assert r.status_code == 202, r.text
        assert sc.wait_idle()
        metrics = client.get("/metrics").text
        streams = client.get("/v1/runs").json()[0]["streams"]["feat"]
    finally:
        sc.close()
    line = next(x for x in metrics.splitlines()
                if x.startswith('repwatch_neural_collapse_nc1{run="r",stream="feat"}'))
    assert float(line.split()[-1]) == pytest.approx(streams["neural_collapse_nc1"], rel=1e-12)
    assert streams["labels_out_of_range"] == 2 * 2            # batches of steps 1 and 2


def test_io_binding_backend_equals_the_plain_backend() -> None:
    """`--io-binding on` (sums kept as ONNX Runtime values, here on the CPU) publishes the same
    values as the plain ONNX backend, across window wraps and the periodic exact rebuild."""
    def run(io_binding: bool) -> list:  # type: ignore[type-arg]
        config = SidecarConfig(every=10, window=256, device="cpu", io_binding=io_binding,
                               monitor_options={"peak_warmup": 10})
        backend = OnnxBackend(config)
        assert backend.kernel.io_binding is io_binding
        for i, (stream, rows, step) in enumerate(_batches(collapse_after=30)):
            backend.ingest("r", stream, rows, None, step)
            if i == 0:                                   # exact rebuilds every 3rd wrap (of 20)
                backend._runs["r"].streams["enc"].cursor.rebuild_every_wraps = 3
        assert backend._runs["r"].streams["enc"].cursor.wraps >= 6
        backend.ingest("r", "enc", _batches()[0][1], None, 50)
        snaps = backend.history("r")
        backend.close()
        return snaps

    plain, bound = run(False), run(True)
    assert [s.step for s in plain] == [s.step for s in bound] == [10, 20, 30, 40, 50]
    for a, b in zip(bound, plain, strict=True):
        for key, ref in b.streams["enc"].items():
            got = a.streams["enc"][key]
            assert (math.isnan(got) and math.isnan(ref)) or got == pytest.approx(
                ref, rel=1e-9, abs=1e-12), (a.step, key)
    assert [a.name for a in bound[-1].alerts] == [a.name for a in plain[-1].alerts]
    assert "RepwatchRepresentationCollapse" in [a.name for a in bound[-1].alerts]

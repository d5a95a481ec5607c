"""ONNX Runtime backend: same values and alerts as the torch backend, and no torch needed."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

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


def test_backend_runs_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\n"
            "from monitor.sidecar.service import SidecarConfig\n"
            "from monitor.sidecar.onnx_backend import OnnxBackend\n"
            "b = OnnxBackend(SidecarConfig(backend='torch', every=1, window=64, device='cpu'))\n"
            "b.ingest('r', 's', np.random.rand(32, 8).astype(np.float32), None, 1)\n"
            "b.ingest('r', 's', np.random.rand(32, 8).astype(np.float32), None, 2)\n"
            "snap = b.snapshots()[0]\n"
            "assert snap.streams['s']['window_samples'] == 32, snap.streams\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr

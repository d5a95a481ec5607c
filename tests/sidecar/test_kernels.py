"""The sidecar's ONNX kernel: parity with the torch scorer code, drift check, no torch needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from monitor.functional.moments import clean_rows, window_delta  # noqa: E402
from monitor.functional.qscore import qscore  # noqa: E402
from monitor.sidecar.kernels import MODEL_PATH, OUTPUTS, OnnxBatchKernel  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kernel() -> OnnxBatchKernel:
    return OnnxBatchKernel(device="cpu")


def _torch_reference(new: np.ndarray, old: np.ndarray) -> dict[str, np.ndarray]:
    n, o = torch.from_numpy(new), torch.from_numpy(old)
    rows, valid, nonfinite = clean_rows(n)
    ds, dz, dn, dnsq = window_delta(rows, o)
    vals = (rows, valid, nonfinite, ds, dz, dn, dnsq, qscore(n))
    return {k: v.numpy() for k, v in zip(OUTPUTS, vals, strict=True)}


def _cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    f32 = np.float32
    adversarial = rng.standard_normal((64, 16)).astype(f32)
    adversarial[1] = np.nan                                   # a NaN row
    adversarial[2, 3] = np.inf                                # one Inf value
    adversarial[3, 0] = -np.inf
    adversarial[4] = 0.0                                      # zero row (normalisation guard)
    adversarial[5] = 7.0                                      # constant row (std 0)
    adversarial[6] *= 1e18                                    # huge values (float64 products)
    adversarial[7] *= 1e-30                                   # tiny values
    return [
        ("gaussian", rng.standard_normal((257, 33)).astype(f32),
         rng.standard_normal((257, 33)).astype(f32)),
        ("relu, no rows leaving", np.maximum(rng.standard_normal((100, 8)), 0).astype(f32),
         np.zeros((0, 8), f32)),
        ("d = 2, one row", rng.standard_normal((1, 2)).astype(f32),
         rng.standard_normal((3, 2)).astype(f32)),
        ("adversarial", adversarial, rng.standard_normal((10, 16)).astype(f32)),
    ]


@pytest.mark.parametrize("name,new,old", _cases(), ids=[c[0] for c in _cases()])
def test_onnx_matches_the_torch_code(kernel: OnnxBatchKernel, name: str, new: np.ndarray,
                                     old: np.ndarray) -> None:
    got = kernel(new, old)
    ref = _torch_reference(new, old)
    for key in OUTPUTS:
        value = np.asarray(getattr(got, key))
        assert value.shape == ref[key].shape, key
        np.testing.assert_allclose(value, ref[key], rtol=1e-5, atol=1e-5 * (
            np.nanmax(np.abs(ref[key])) if np.isfinite(ref[key]).any() else 1.0),
            equal_nan=True, err_msg=f"{name}: {key}")


def test_shipped_model_matches_a_fresh_export(tmp_path: Path, kernel: OnnxBatchKernel) -> None:
    """Drift check: the committed model computes what the current torch code exports."""
    from monitor.sidecar.export_kernels import export

    fresh = OnnxBatchKernel(export(tmp_path / "k.onnx"), device="cpu")
    _, new, old = _cases()[3]
    a, b = kernel(new, old), fresh(new, old)
    for key in OUTPUTS:
        np.testing.assert_array_equal(np.asarray(getattr(a, key)), np.asarray(getattr(b, key)),
                                      err_msg=key)


def test_runs_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\n"
            "from monitor.sidecar.kernels import OnnxBatchKernel\n"
            "k = OnnxBatchKernel(device='cpu')\n"
            "r = k(np.ones((4, 3), np.float32), np.zeros((0, 3), np.float32))\n"
            "assert r.valid.sum() == 4 and r.ds[0, 0] == 4.0\n"
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_bad_input_and_missing_model(kernel: OnnxBatchKernel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="same d"):
        kernel(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="d >= 2"):
        kernel(np.zeros((2, 1), np.float32), np.zeros((0, 1), np.float32))
    with pytest.raises(FileNotFoundError, match="export_kernels"):
        OnnxBatchKernel(tmp_path / "nope.onnx")
    assert MODEL_PATH.is_file()

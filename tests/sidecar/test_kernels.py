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


@pytest.mark.slow
def test_shipped_model_matches_a_fresh_export(tmp_path: Path, kernel: OnnxBatchKernel) -> None:
    """Drift check: the committed model computes what the current torch code exports."""
    from monitor.sidecar.export_kernels import export

    fresh = OnnxBatchKernel(export(tmp_path / "k.onnx"), device="cpu")
    _, new, old = _cases()[3]
    a, b = kernel(new, old), fresh(new, old)
    for key in OUTPUTS:
        np.testing.assert_array_equal(np.asarray(getattr(a, key)), np.asarray(getattr(b, key)),
                                      err_msg=key)


@pytest.mark.e2e
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


@pytest.fixture(scope="module")
def bound() -> OnnxBatchKernel:
    return OnnxBatchKernel(device="cpu", io_binding=True)


def test_io_binding_step_equals_the_plain_kernel(kernel: OnnxBatchKernel,
                                                 bound: OnnxBatchKernel) -> None:
    """The I/O-binding path (sums kept as device values, deltas added by accumulate.onnx)
    gives the plain path's outputs and the running sums of its deltas, batch after batch."""
    assert bound.io_binding and not kernel.io_binding
    rng = np.random.default_rng(1)
    d = 12
    sums = bound.zeros(d)
    ref = [np.zeros((d, d)), np.zeros(d), np.zeros(d), np.zeros(d)]
    for step in range(6):
        new = rng.standard_normal((40 + step, d)).astype(np.float32)
        if step == 2:
            new[3] = np.nan
        old = rng.standard_normal((5 * step, d)).astype(np.float32)
        plain = kernel(new, old)
        rows, sums = bound.step(new, old, sums)
        for key in ("rows", "valid", "q"):
            np.testing.assert_array_equal(getattr(rows, key), getattr(plain, key), err_msg=key)
        assert rows.nonfinite == plain.nonfinite
        for k, delta in enumerate((plain.ds, plain.dz, plain.dn, plain.dnsq)):
            ref[k] = ref[k] + delta
        for got, want in zip(sums.numpy(), ref, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-12)
    ring = rng.standard_normal((30, d)).astype(np.float32)             # a rebuild
    _, rebuilt = bound.step(ring, np.zeros((0, d), np.float32), None)
    plain = kernel(ring, np.zeros((0, d), np.float32))
    for got, want in zip(rebuilt.numpy(), (plain.ds, plain.dz, plain.dn, plain.dnsq), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(RuntimeError, match="io_binding=True"):
        kernel.step(ring, ring, None)
    with pytest.raises(ValueError, match="same d"):
        bound.step(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32), None)


@pytest.mark.slow
def test_shipped_accumulate_model_matches_a_fresh_build(tmp_path: Path) -> None:
    import onnx

    from monitor.sidecar.kernels import ACCUMULATE_PATH, build_accumulate_model

    shipped = onnx.load(str(ACCUMULATE_PATH))
    assert shipped.SerializeToString() == build_accumulate_model().SerializeToString()
    onnx.checker.check_model(shipped, full_check=True)


@pytest.mark.cuda
def test_io_binding_on_the_cuda_execution_provider(kernel: OnnxBatchKernel) -> None:
    """With onnxruntime-gpu and a GPU: the default kernel binds (sums on the GPU) and agrees
    with the CPU kernel."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with a visible GPU")
    gpu = OnnxBatchKernel(device="cuda")
    assert gpu.io_binding and gpu.providers[0] == "CUDAExecutionProvider"
    rng = np.random.default_rng(2)
    new = rng.standard_normal((512, 64)).astype(np.float32)
    old = rng.standard_normal((512, 64)).astype(np.float32)
    sums = gpu.zeros(64)
    for _ in range(3):
        rows, sums = gpu.step(new, old, sums)
    plain = kernel(new, old)
    np.testing.assert_allclose(sums.numpy()[0], 3 * plain.ds, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(rows.q, plain.q, rtol=1e-5, equal_nan=True)

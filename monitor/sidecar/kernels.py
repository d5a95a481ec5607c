"""The sidecar's per-batch scoring kernel on ONNX Runtime (no torch needed to run it).

The kernel is exported from the torch code the in-process scorers use
(:func:`monitor.functional.moments.clean_rows`, :func:`~monitor.functional.moments.window_delta`,
:func:`monitor.functional.qscore.qscore`) by :mod:`monitor.sidecar.export_kernels`, so the
per-batch math exists once; ``models/batch_kernel.onnx`` ships with the package and a test
fails when it drifts from the torch code. Inputs and outputs (``b`` new rows, ``b'`` rows
leaving the window, dimension ``d``; dynamic):

========== ============ =======================================================================
name       shape, dtype meaning
========== ============ =======================================================================
new        (b, d) f32   the incoming rows (raw: may hold NaN/Inf)
old        (b', d) f32  the (clean) rows they replace in the window ring
rows       (b, d) f32   ``new`` with non-finite rows zeroed (what the ring stores)
valid      (b,) f64     1 for finite rows, 0 otherwise
nonfinite  () f64       number of non-finite values in ``new``
ds         (d, d) f64   ``rowsᵀrows − oldᵀold``
dz         (d,) f64     Δ Σz
dn, dnsq   (d,) f64     Δ Σẑ and Δ Σẑ² of the L2-normalised rows
q          (b,) f64     per-row Q-Score (paper form ``linf_over_l1``; NaN for non-finite rows)
========== ============ =======================================================================

The d×d publish step (eigendecomposition) is not an ONNX op; the backend runs it in numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODEL_PATH: Path = Path(__file__).with_name("models") / "batch_kernel.onnx"
INPUTS: tuple[str, ...] = ("new", "old")
OUTPUTS: tuple[str, ...] = ("rows", "valid", "nonfinite", "ds", "dz", "dn", "dnsq", "q")


@dataclass(frozen=True)
class KernelResult:
    """Outputs of one kernel call (numpy arrays on the host)."""

    rows: np.ndarray
    valid: np.ndarray
    nonfinite: float
    ds: np.ndarray
    dz: np.ndarray
    dn: np.ndarray
    dnsq: np.ndarray
    q: np.ndarray


def providers_for(device: str = "auto") -> list[str]:
    """ONNX Runtime execution providers for ``device``: ``auto`` takes CUDA when the installed
    onnxruntime offers it (the ``onnxruntime-gpu`` wheel with a visible GPU), else the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise RuntimeError("device='cuda' needs onnxruntime-gpu with a visible GPU; available "
                           f"providers: {available}")
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxBatchKernel:
    """Runs ``batch_kernel.onnx`` with ONNX Runtime."""

    def __init__(self, path: str | Path = MODEL_PATH, device: str = "auto",
                 threads: int = 0) -> None:
        """``threads``: ONNX Runtime intra-op threads (0: its default, one per core)."""
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"kernel model {path} is missing; regenerate it with "
                                    "`python -m monitor.sidecar.export_kernels` (needs torch)")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers_for(device))
        names = tuple(o.name for o in self.session.get_outputs())
        if names != OUTPUTS:
            raise ValueError(f"{path}: expected outputs {OUTPUTS}, got {names}")

    @property
    def providers(self) -> list[str]:
        """The execution providers the session uses."""
        return list(self.session.get_providers())

    def __call__(self, new: np.ndarray, old: np.ndarray) -> KernelResult:
        """Score ``new`` rows (b, d) replacing ``old`` rows (b', d) of the window."""
        if new.ndim != 2 or old.ndim != 2 or new.shape[1] != old.shape[1]:
            raise ValueError(f"expected new (b, d) and old (b', d) with the same d, got "
                             f"{new.shape} and {old.shape}")
        if new.shape[1] < 2:
            raise ValueError(f"expected d >= 2 features per row, got d = {new.shape[1]}")
        out = self.session.run(None, {"new": np.ascontiguousarray(new, dtype=np.float32),
                                      "old": np.ascontiguousarray(old, dtype=np.float32)})
        values = dict(zip(OUTPUTS, out, strict=True))
        values["nonfinite"] = float(values["nonfinite"])
        return KernelResult(**values)

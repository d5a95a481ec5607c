"""Export the sidecar's per-batch kernel to ONNX from the torch scorer code (needs torch).

    python -m monitor.sidecar.export_kernels [--out monitor/sidecar/models/batch_kernel.onnx]

The result ships with the package; ``tests/sidecar/test_kernels.py`` fails when the shipped
model and a fresh export of the current torch code disagree.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from monitor.functional.moments import clean_rows, window_delta
from monitor.functional.qscore import qscore
from monitor.sidecar.kernels import (ACCUMULATE_PATH, INPUTS, MODEL_PATH, OUTPUTS,
                                     build_accumulate_model)


class BatchKernel(nn.Module):
    """The per-batch work of one stream: clean, window delta, per-row Q-Score."""

    def forward(self, new: Tensor, old: Tensor) -> tuple[Tensor, ...]:
        rows, valid, nonfinite = clean_rows(new)
        ds, dz, dn, dnsq = window_delta(rows, old)
        return rows, valid, nonfinite, ds, dz, dn, dnsq, qscore(new)


def export(out: str | Path = MODEL_PATH) -> Path:
    """Export :class:`BatchKernel` with dynamic rows and dimension to ``out``.

    ``optimize=False``: with torch 2.13 / onnxscript 0.7 the exporter's graph optimiser drops
    ``x + 1e-8`` terms (the ε guards of the Q-Score), which turns zero and constant rows into
    NaN; the parity test catches it."""
    b = torch.export.Dim("b", min=1, max=1 << 24)
    b_old = torch.export.Dim("b_old", min=0, max=1 << 24)
    d = torch.export.Dim("d", min=2, max=1 << 16)
    example = (torch.randn(8, 5), torch.randn(8, 5))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            BatchKernel(), example, dynamo=True, optimize=False, input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_shapes={"new": {0: b, 1: d}, "old": {0: b_old, 1: d}})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(out))
    return out


def export_accumulate(out: str | Path = ACCUMULATE_PATH) -> Path:
    """Write ``accumulate.onnx`` (the I/O-binding path's on-device sum update)."""
    import onnx

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build_accumulate_model(), str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(MODEL_PATH))
    parser.add_argument("--accumulate-out", default=str(ACCUMULATE_PATH))
    args = parser.parse_args()
    print(export(args.out))
    print(export_accumulate(args.accumulate_out))


if __name__ == "__main__":
    main()

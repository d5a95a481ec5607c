"""Error of the sketched spectral path against the exact one on the docs/metrics.md reference spectra.

For each dimension d and each reference spectrum, one window of n rows goes through the exact
state (:class:`monitor.scorers.moments.WindowMoments` + ``SpectrumScorer``) and through the
sketched state for every k (:class:`monitor.scorers.sketch.SketchedMoments` +
``SketchedSpectrumScorer``) — the code the Monitor runs — and the table prints
``exact → sketched`` per metric with the relative error, plus the time of update + publish.

Spectra (rows iid Gaussian, covariance diagonal: a Gaussian sketch is rotation invariant, so a
rotated covariance gives the same error distribution): isotropic; power law λ_i = i^−α for
α = 0.5, 1, 2; a rank-32 embedding (Z = G·B, G n×32, B 32×d Gaussian); complete collapse (every
row the same vector).

    .venv/bin/python benchmarks/sketch_error.py                      # d = 4096, ~3-5 min on 2 cores
    .venv/bin/python benchmarks/sketch_error.py --dims 4096 8192     # the docs table, ~20 min
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitor.scorers.collapse import CollapseScorer
from monitor.scorers.moments import WindowMoments
from monitor.scorers.sketch import SketchedMoments
from monitor.scorers.sketch_spectrum import SketchedSpectrumScorer
from monitor.scorers.spectrum import SpectrumScorer

METRICS: tuple[tuple[str, str], ...] = (
    ("effective_rank", "RankMe"), ("effective_rank_ratio", "RankMe ratio"),
    ("participation_ratio", "PR"), ("srank", "srank"), ("spectrum_alpha", "α"),
    ("top_eigenvalue_share", "top share"), ("embedding_std_ratio", "std ratio"),
    ("mean_cosine_similarity", "mean cos"),
)


def _spectra() -> dict[str, Callable[[int, int, torch.Generator], Tensor]]:
    def power(alpha: float) -> Callable[[int, int, torch.Generator], Tensor]:
        def make(n: int, d: int, gen: torch.Generator) -> Tensor:
            scale = torch.arange(1, d + 1, dtype=torch.float32).pow(-alpha / 2)
            return torch.randn(n, d, generator=gen) * scale
        return make

    def rank32(n: int, d: int, gen: torch.Generator) -> Tensor:
        return torch.randn(n, 32, generator=gen) @ torch.randn(32, d, generator=gen)

    def collapse(n: int, d: int, gen: torch.Generator) -> Tensor:
        return torch.randn(1, d, generator=gen).expand(n, d).contiguous()

    return {"isotropic": lambda n, d, g: torch.randn(n, d, generator=g),
            "power α=0.5": power(0.5), "power α=1": power(1.0), "power α=2": power(2.0),
            "rank-32": rank32, "collapse": collapse}


def _score(state: WindowMoments, rows: Tensor, spectrum: SpectrumScorer) -> tuple[dict[str, float], float]:
    t0 = time.perf_counter()
    state.update(rows)
    out = {**spectrum.compute(state), **CollapseScorer().compute(state)}
    values = {k: float(v) for k, v in out.items() if v.dim() == 0}
    return values, time.perf_counter() - t0


def _rel(exact: float, approx: float) -> float:
    if not (math.isfinite(exact) and math.isfinite(approx)):
        return math.nan
    return (approx - exact) / abs(exact) if exact != 0 else math.nan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[4096])
    parser.add_argument("--sketch-dims", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--window", type=int, default=8192, help="rows n in the window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spectra", nargs="+", default=None, help="subset of the spectra")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    spectra = _spectra()
    names = args.spectra or list(spectra)
    print(f"# sketch error: n = {args.window}, dims {args.dims}, k {args.sketch_dims}, "
          f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads")
    head = " | ".join(f"{label} exact → sketch (rel)" for _, label in METRICS)
    print(f"| spectrum | d | k | {head} | time exact / sketch s |")
    print("|" + " --- |" * (len(METRICS) + 4))
    results = []
    for d in args.dims:
        for name in names:
            gen = torch.Generator().manual_seed(args.seed)
            rows = spectra[name](args.window, d, gen)                       # (n, d) float32
            exact, t_exact = _score(WindowMoments(d, args.window), rows, SpectrumScorer())
            for k in args.sketch_dims:
                state = SketchedMoments(d, args.window, k, seed=args.seed)
                _ = state.omega                                             # not timed: drawn once
                sketch, t_sketch = _score(state, rows, SketchedSpectrumScorer())
                cells = []
                for key, _label in METRICS:
                    e, s = exact[key], sketch[key]
                    r = _rel(e, s)
                    cells.append(f"{e:.4g} → {s:.4g} ({r:+.1%})" if math.isfinite(r)
                                 else f"{e:.4g} → {s:.4g}")
                print(f"| {name} | {d} | {k} | " + " | ".join(cells)
                      + f" | {t_exact:.1f} / {t_sketch:.1f} |", flush=True)
                results.append({"spectrum": name, "d": d, "k": k, "n": args.window,
                                "exact": exact, "sketch": sketch,
                                "seconds_exact": t_exact, "seconds_sketch": t_sketch})
            del rows
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Mode-collapse statistics of a generator's outputs as pure functions (docs/metrics.md §9).

All distances are Euclidean, computed in float64 from a Gram matrix of the *column-centred*
rows (``‖xᵢ − xⱼ‖² = ‖xᵢ‖² + ‖xⱼ‖² − 2 xᵢ·xⱼ``; distances do not change under a translation,
and centring first keeps the cancellation small when the rows sit far from the origin),
clamped at 0 and with an exact zero diagonal.

* Diversity (design of docs/metrics.md §9, common practice; e.g. the AC-GAN MS-SSIM check of Odena
  et al. 2017 in image space): mean pairwise distance of generated rows ÷ the same statistic on
  real rows. ≪ 1 means the generator covers far less of the space than the data.
* Birthday-paradox duplicates (Arora & Zhang 2017; Arora, Risteski & Zhang, ICLR 2018): a
  distribution of support N has a near-duplicate in a sample of ≈ √N. Here a sample counts as
  a duplicate when its nearest *other* sample is closer than ``eps``, with ``eps`` calibrated
  as a low quantile of the real nearest-neighbour distances at the same sample size (a design
  of docs/metrics.md §9, not the paper's human-inspected protocol).
* Mode coverage on 2-D mixtures (Metz et al. 2017, unrolled GAN; Srivastava et al. 2017,
  VEEGAN): a sample is "high quality" within 3σ of its nearest mode; a mode is covered when at
  least ``min_count`` high-quality samples fall on it. docs/metrics.md marks these conventions [R]
  (recalled, not checked against the papers), so both ``n_sigma`` and ``min_count`` are
  parameters.

Every function takes an optional per-row ``valid`` weight (0/1; default all ones) so that the
streaming scorer can mask empty or non-finite reservoir slots without a host synchronisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def as_rows(x: Tensor, what: str = "x") -> Tensor:
    """``x`` as float64 rows ``(n, d)``, or a clear TypeError/ValueError naming ``what``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D (n, d) tensor of rows, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{what}: expected a floating-point tensor, got {x.dtype}")
    return x.to(torch.float64)


def _valid(x: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    if valid.shape != (x.shape[0],):
        raise ValueError(f"valid: expected shape ({x.shape[0]},), got {tuple(valid.shape)}")
    return valid.to(device=x.device, dtype=torch.float64)


def pairwise_distances(x: Tensor, valid: Tensor | None = None) -> Tensor:
    """Euclidean distance matrix ``(n, n)`` of rows ``x`` (n, d) in float64, zero diagonal.

    Gram route on column-centred rows (centred over the ``valid`` rows): ``O(n²d)``.
    """
    z = as_rows(x)
    v = _valid(z, valid)                                             # (n,)
    mean = (z * v[:, None]).sum(0) / v.sum().clamp_min(1.0)          # (d,)
    z = (z - mean) * v[:, None]                                      # masked rows → 0
    sq = (z * z).sum(1)                                              # (n,)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)                 # (n, n)
    d2 = d2.clamp_min(0.0)
    d2.fill_diagonal_(0.0)
    return d2.sqrt()


def mean_pairwise_distance(x: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean Euclidean distance over distinct pairs ``i ≠ j`` of (valid) rows; NaN for < 2 rows."""
    dist = pairwise_distances(x, valid)
    v = _valid(dist, valid)
    count = v.sum()
    total = (dist * v[:, None] * v[None, :]).sum()
    mean = total / (count * (count - 1.0)).clamp_min(1.0)
    return torch.where(count >= 2, mean, torch.full_like(mean, math.nan))


def diversity_ratio(fake: Tensor, real: Tensor, fake_valid: Tensor | None = None,
                    real_valid: Tensor | None = None) -> Tensor:
    """Mean pairwise distance of ``fake`` rows ÷ that of ``real`` rows (docs/metrics.md §9).

    ≈ 1 when the generator spreads like the data, → 0 on complete mode collapse. Partial
    collapse onto modes far apart can keep it high: read it with the duplicate rate.
    """
    f, r = as_rows(fake, "fake"), as_rows(real, "real")
    if f.shape[1] != r.shape[1]:
        raise ValueError(f"fake and real rows must have the same dimension, got {f.shape[1]} and {r.shape[1]}")
    return mean_pairwise_distance(f, fake_valid) / mean_pairwise_distance(r, real_valid)


def nearest_neighbour_distances(x: Tensor, valid: Tensor | None = None) -> Tensor:
    """Distance ``(n,)`` from each row to its nearest *other* valid row (``inf`` if none)."""
    dist = pairwise_distances(x, valid)
    v = _valid(dist, valid)
    inf = torch.full_like(dist, math.inf)
    dist = torch.where(v[None, :] > 0, dist, inf)                    # invalid neighbours: never nearest
    dist.fill_diagonal_(math.inf)                                    # exclude self
    return dist.min(dim=1).values


def duplicate_threshold(real: Tensor, quantile: float = 0.01, valid: Tensor | None = None) -> Tensor:
    """Duplicate distance ε: the ``quantile`` of the real rows' nearest-neighbour distances.

    Calibrated so that the real data's own duplicate rate is ≈ ``quantile`` at this sample size
    (nearest-neighbour distances shrink as n grows: compare fake and real at equal n).
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
    r = as_rows(real, "real")
    nn = nearest_neighbour_distances(r, valid)
    v = _valid(r, valid)
    nn = torch.where((v > 0) & torch.isfinite(nn), nn, torch.full_like(nn, math.nan))
    return torch.nanquantile(nn, quantile)


def duplicate_rate(fake: Tensor, eps: Tensor | float, valid: Tensor | None = None) -> Tensor:
    """Fraction of (valid) rows whose nearest other row is closer than ``eps`` (strictly).

    Birthday-paradox duplicate test (Arora & Zhang 2017) with a fixed threshold; NaN for < 2 rows.
    """
    f = as_rows(fake, "fake")
    v = _valid(f, valid)
    nn = nearest_neighbour_distances(f, valid)
    eps_t = torch.as_tensor(eps, dtype=torch.float64, device=f.device)
    dup = (nn < eps_t).to(torch.float64) * v
    count = v.sum()
    rate = dup.sum() / count.clamp_min(1.0)
    return torch.where(count >= 2, rate, torch.full_like(rate, math.nan))


def mode_coverage(samples: Tensor, modes: Tensor, sigma: float, min_count: int = 1,
                  n_sigma: float = 3.0) -> tuple[Tensor, Tensor]:
    """Modes covered and high-quality fraction of samples from a Gaussian mixture.

    A sample is *high quality* when it lies within ``n_sigma·sigma`` of its nearest mode
    (3σ in Metz et al. 2017 / VEEGAN; docs/metrics.md §9 [R]); a mode is *covered* when at least
    ``min_count`` high-quality samples are assigned to it. Returns
    ``(modes covered (int64, 0-d), high-quality fraction (float64, 0-d))``.
    """
    x, m = as_rows(samples, "samples"), as_rows(modes, "modes")
    if x.shape[1] != m.shape[1]:
        raise ValueError(f"samples and modes must have the same dimension, got {x.shape[1]} and {m.shape[1]}")
    if m.shape[0] < 1 or x.shape[0] < 1:
        raise ValueError(f"need at least one sample and one mode, got {x.shape[0]} and {m.shape[0]}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count!r}")
    dist = torch.cdist(x, m)                                          # (n, k)
    nearest = dist.min(dim=1)                                         # (n,)
    good = nearest.values <= n_sigma * sigma                          # (n,)
    counts = torch.zeros(m.shape[0], dtype=torch.float64, device=x.device)
    counts.index_add_(0, nearest.indices, good.to(torch.float64))     # (k,)
    covered = (counts >= min_count).sum()
    return covered, good.to(torch.float64).mean()


def effective_rank_ratio(fake_rankme: Tensor | float, real_rankme: Tensor | float) -> Tensor:
    """RankMe of the generated stream ÷ RankMe of the real stream (< 1: fewer directions used)."""
    f = torch.as_tensor(fake_rankme, dtype=torch.float64)
    r = torch.as_tensor(real_rankme, dtype=torch.float64, device=f.device)
    return torch.where(r > 0, f / r, torch.full_like(f, math.nan))

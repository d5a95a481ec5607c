"""Scenario (Metz et al. 2017; VEEGAN): a GAN on the 8-Gaussian ring that covers every mode vs one
whose generator is too fast and collapses onto one or two modes, and what PairScorer sees.

Mode coverage (the independent check, ``mode_coverage`` on 2000 fresh samples: high quality =
within 3σ of a mode, a mode covered with ≥ 20 of them) establishes which run collapsed. The
PairScorer is fed the fake/real batches of the last 300 steps of each run and read every 50
steps (6 reads per run).

Measured on this 2-core CPU (seeds 0–3, 1000–1200 steps, 8 reads each): diversity ratio
0.97–1.02 healthy vs 0.08–0.40 collapsed. The birthday-paradox duplicate rate did *not*
separate the runs (0–0.016 healthy, 0–0.10 collapsed, real baseline 0.012): the collapsed
generator's blob around one mode is wider than a real mode (σ = 0.05), so in 2-D its samples
are no denser than real ones. That is why only the healthy run's duplicate rate is asserted
(no false alarm), and the diversity ratio carries the decision.
"""

from __future__ import annotations

import time

import pytest
import torch

from monitor import Monitor
from monitor.functional.generative import mode_coverage
from monitor.scenarios.gan import build_gan, train_gan

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

HEALTHY_STEPS, COLLAPSED_STEPS, WATCH, READ_EVERY = 1200, 600, 300, 50


def _run(collapse: bool, steps: int) -> dict:  # type: ignore[type-arg]
    setup = build_gan(seed=0, device="cpu", collapse=collapse)
    mon = Monitor(run="gan", every=READ_EVERY, window=512, max_rows=256, port=None,
                  qscore=False, peak_warmup=0)
    mon.pair("fake", "real", reservoir=512, dup_quantile=0.01)
    reads: list[dict[str, float]] = []
    fired: list[str] = []
    mon.on_alert(lambda a: fired.append(f"{a.name}/{a.stream}"))

    def on_step(step: int, fake: torch.Tensor, real: torch.Tensor) -> None:
        if step > steps - WATCH:                  # the monitor sees the last WATCH steps
            mon.observe("fake", fake)
            mon.observe("real", real)
            snap = mon.step()
            if snap is not None:
                reads.append(dict(snap.streams["fake"]))

    t0 = time.perf_counter()
    train_gan(setup, steps, on_step)
    seconds = time.perf_counter() - t0
    samples = setup.generate(2000)
    covered, quality = mode_coverage(samples, setup.modes, setup.config.sigma, min_count=20)
    nearest = torch.cdist(samples.double(), setup.modes).argmin(1)
    occupied = int((torch.zeros(8).index_add_(0, nearest, torch.ones(2000)) >= 100).sum())
    return {"covered": int(covered), "quality": float(quality), "occupied": occupied,
            "reads": reads, "seconds": seconds, "fired": fired,
            "errors": mon.latest.errors if mon.latest else None}


@pytest.fixture(scope="module")
def healthy() -> dict:  # type: ignore[type-arg]
    return _run(False, HEALTHY_STEPS)


@pytest.fixture(scope="module")
def collapsed() -> dict:  # type: ignore[type-arg]
    return _run(True, COLLAPSED_STEPS)


def test_mode_coverage_differs_as_intended(healthy: dict, collapsed: dict) -> None:  # type: ignore[type-arg]
    assert healthy["covered"] >= 7 and healthy["occupied"] == 8, healthy
    assert collapsed["covered"] <= 2 and collapsed["occupied"] <= 3, collapsed
    assert healthy["quality"] > 0.3


def test_diversity_ratio_separates_the_runs(healthy: dict, collapsed: dict) -> None:  # type: ignore[type-arg]
    h = [r["generator_diversity_ratio"] for r in healthy["reads"]]
    c = [r["generator_diversity_ratio"] for r in collapsed["reads"]]
    assert len(h) == len(c) == WATCH // READ_EVERY
    assert min(h) > 0.85, h            # measured 0.97–1.02
    assert max(c) < 0.6, c             # measured 0.08–0.40
    assert all(r["generator_samples"] == 512 for r in healthy["reads"] + collapsed["reads"])


def test_mode_collapse_alert_fires_only_for_the_collapsed_run(healthy: dict, collapsed: dict) -> None:  # type: ignore[type-arg]
    assert "RepwatchGeneratorModeCollapse/fake" in collapsed["fired"], collapsed["fired"]
    assert healthy["fired"] == [], healthy["fired"]
    assert healthy["errors"] == {} and collapsed["errors"] == {}
    ranks = [r["generator_effective_rank_ratio"] for r in collapsed["reads"]]
    assert all(0 < x < 1.5 for x in ranks), ranks


def test_duplicate_rates(healthy: dict, collapsed: dict) -> None:  # type: ignore[type-arg]
    for run in (healthy, collapsed):
        for r in run["reads"]:          # calibration: ≈ dup_quantile (6 of 512 rows strictly below)
            assert r["real_duplicate_rate"] == pytest.approx(0.01, abs=0.006)
    assert max(r["generator_duplicate_rate"] for r in healthy["reads"]) <= 0.05


def test_training_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    train_gan(build_gan(seed=3), 5)
    assert torch.equal(torch.get_rng_state(), before)

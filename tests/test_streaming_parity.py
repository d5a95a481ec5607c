"""Streaming == functional == independent numpy reference, in one process and across two ranks.

Every case of :mod:`tests.tester` streams its batches through a real streaming path (the
scorers, or a ``Monitor`` with ``observe`` + ``step``), reads it at several points, and compares
each read — and ``monitor.functional`` on the window's rows, torch and numpy — with the numpy
reference written in the tester. Signals: the spectral set (effective_rank, effective_rank_ratio,
srank, spectrum_alpha, participation_ratio, top_eigenvalue_share, window_samples,
embedding_dim, the spectrum), the collapse set (embedding_std_ratio, mean_cosine_similarity,
embedding_variance), the Q-Score window (qscore_p10, qscore_p50, low_quality_samples_ratio
with a fixed threshold) and neural collapse (NC1, the three NC2 measures, classes, samples),
plus the counters (samples, nonfinite_values, labels_out_of_range, nonfinite_rows).
Tolerances: :data:`tests.tester.TOLERANCES` and :data:`tests.tester.LOOSE`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests import tester
from tests.tester import Case

pytestmark = pytest.mark.usefixtures("single_thread")

# Cycling batch sizes: windows fill and wrap at different offsets.
_SIZES = (7, 20, 33, 13, 40)

SCORER_CASES = [
    # read after every batch: incremental sums only, over 7 wraps (no periodic rebuild)
    Case("isotropic, read every batch, incremental over 7 wraps", "isotropic", 24, 96,
         _SIZES * 6, seed=1, rebuild_every_wraps=0),
    # reads every 4th batch (~100 rows > window between some reads: lazy rebuild), no
    # periodic rebuild
    Case("isotropic + mean, lazy rebuilds", "isotropic", 24, 96, _SIZES * 6, seed=2,
         offset=0.5, read_every=4, rebuild_every_wraps=0),
    # a batch larger than the window, read once at the end
    Case("batch larger than the window", "isotropic", 16, 64, (10, 150, 30, 7), seed=3,
         read_every=None),
    # α fitted over ranks 11–100 of d = 128; n > d; an exact rebuild at every wrap
    Case("power law, d = 128", "power_law", 128, 400, (64,) * 10, seed=4, offset=0.3,
         read_every=2, rebuild_every_wraps=1),
    # window < d: K = min(n, d) = n
    Case("n < d", "isotropic", 64, 40, (15,) * 8, seed=5),
    Case("low rank 20 in d = 48", "low_rank", 48, 160, (30,) * 12, seed=6, rank=20,
         read_every=3),
    Case("collapsed to a point", "collapsed", 16, 128, (32,) * 10, seed=7, read_every=2),
    Case("non-finite rows", "isotropic", 16, 64, (16,) * 10, seed=8, nonfinite_every=7),
    Case("post-ReLU rows (Q-Score), non-finite rows", "isotropic", 32, 128,
         (40, 25, 60, 31) * 3, seed=9, relu=True, nonfinite_every=11),
    # 32·e_j rows (every 9th): tied scores, exactly τ (the ratio counts q < τ only)
    Case("post-ReLU rows, scores tied at the threshold", "isotropic", 32, 128,
         (40, 25, 60, 31) * 2, seed=15, relu=True, tie_every=9),
    # neural collapse: class 2 leaves the stream at row 200, the window slides past it
    Case("labelled, a class leaves the window", "isotropic", 6, 150, (40,) * 13, seed=10,
         classes=4, absent_after=200),
    Case("labelled, bad labels and non-finite rows", "isotropic", 5, 100, (25,) * 8, seed=11,
         classes=3, nonfinite_every=13, bad_label_every=17),
    Case("labelled, d < C", "isotropic", 3, 200, (50,) * 6, seed=12, classes=10, spread=1.0),
    Case("labelled, window < d", "isotropic", 64, 20, (5,) * 10, seed=13, classes=4,
         spread=1.0),
    # within-class spread 0.05 around class means 3·N(0, 1) + 5
    Case("labelled, near collapse", "isotropic", 24, 200, (50,) * 6, seed=14, classes=6,
         scale=0.05, spread=3.0, offset=5.0),
]

MONITOR_CASES = [
    # 16-row window, a publish after every batch (≤ 16 rows: the sums stay incremental) and
    # 1080 rows = 67 wraps: WindowMoments' periodic exact rebuild (every 64 wraps) inside the
    # Monitor. The functional routes are checked on every 8th publish (time).
    Case("monitor: 64+ wraps, labelled, non-finite rows", "isotropic", 6, 16,
         (16, 12, 16, 10) * 20, seed=20, classes=3, nonfinite_every=23, bad_label_every=31,
         read_every=1),
    # publishes every 5 steps of 64 rows: more than the window between reads (lazy rebuild)
    Case("monitor: power law, labelled, every 5", "power_law", 128, 256, (64,) * 20, seed=21,
         offset=0.3, classes=5, read_every=5),
    Case("monitor: post-ReLU, window < d, every 2", "isotropic", 40, 32, (8,) * 16, seed=22,
         relu=True, classes=4, nonfinite_every=9, bad_label_every=14, read_every=2),
]


@pytest.mark.parametrize("case", SCORER_CASES, ids=str)
def test_scorers_equal_functional_and_reference(case: Case) -> None:
    tester.assert_agree(case, tester.stream_scorers(case))


@pytest.mark.parametrize("case", MONITOR_CASES, ids=str)
def test_monitor_equals_functional_and_reference(case: Case) -> None:
    readings = tester.stream_monitor(case)
    assert len(readings) == len(case.batches) // case.read_every
    tester.assert_agree(case, readings, functional_every=8)


def _final(case: Case) -> dict[str, float]:
    z, y, _ = tester.window_rows(case, len(case.batches))
    return tester.reference(case, z, y, tester.threshold(case))[0]


def test_the_cases_reach_what_they_are_named_after() -> None:
    """The schedules wrap, rebuild, drop classes and give finite values (the agreement above is
    not all-NaN or trivial)."""
    by_name = {case.name: case for case in SCORER_CASES + MONITOR_CASES}
    periodic = by_name["monitor: 64+ wraps, labelled, non-finite rows"]
    assert sum(periodic.batches) // periodic.window >= 64 and max(periodic.batches) <= 16
    incremental = by_name["isotropic, read every batch, incremental over 7 wraps"]
    assert sum(incremental.batches) >= 6 * incremental.window
    lazy = by_name["isotropic + mean, lazy rebuilds"]
    assert any(sum(lazy.batches[i:i + 4]) > lazy.window for i in range(0, 30, 4))
    assert max(by_name["batch larger than the window"].batches) > 64
    power_case = by_name["power law, d = 128"]
    assert sum(power_case.batches) > power_case.window and power_case.rebuild_every_wraps == 1
    power = _final(power_case)
    assert math.isfinite(power["spectrum_alpha"]) and power["window_samples"] == 400
    assert math.isfinite(_final(by_name["low rank 20 in d = 48"])["spectrum_alpha"])
    assert _final(by_name["collapsed to a point"])["mean_cosine_similarity"] > 0.99
    assert _final(by_name["n < d"])["window_samples"] == 40
    assert _final(by_name["labelled, near collapse"])["neural_collapse_nc1"] < 1e-3
    leaves = by_name["labelled, a class leaves the window"]
    z, y, _ = tester.window_rows(leaves, 5)
    assert tester.reference(leaves, z, y, 0.0)[0]["neural_collapse_classes"] == 4.0
    assert _final(leaves)["neural_collapse_classes"] == 3.0
    for case in SCORER_CASES + MONITOR_CASES:
        final = _final(case)
        assert 0.0 < final["low_quality_samples_ratio"] < 1.0, case.name
        for key in ("effective_rank", "participation_ratio", "embedding_std_ratio"):
            assert math.isfinite(final[key]), (case.name, key)
        if case.classes:
            assert math.isfinite(final["neural_collapse_nc1"]), case.name
        if case.nonfinite_every or case.bad_label_every:
            counters = tester.window_rows(case, len(case.batches))[2]
            assert counters["nonfinite_values"] > 0, case.name
            assert not case.bad_label_every or counters["labels_out_of_range"] > 0, case.name


def test_a_broken_reference_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison can fail: RankMe's ε = 1e-6 instead of 1e-7 in the reference."""
    case = SCORER_CASES[0]
    readings = tester.stream_scorers(case)[:2]
    assert not tester.check(case, readings)
    monkeypatch.setattr(tester, "RANKME_EPS", 1e-6)
    bad = tester.check(case, readings)
    assert any("effective_rank" in line for line in bad)


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_two_ranks_publish_the_single_process_values(tmp_path: Path) -> None:
    """Two gloo ranks, each fed half of every batch, one spawn for all cases: at every publish
    rank 0 and rank 1 publish the same values, equal to the reference on the union of the two
    ranks' windows; at the last publish also to one process fed that union."""
    from tests.engine.test_distributed import spawn

    tester.write_cases(MONITOR_CASES, tmp_path)
    r0, r1 = spawn(tester.two_rank_worker, tmp_path)
    for case in MONITOR_CASES:
        a, b = r0[case.name], r1[case.name]
        assert len(a) == len(b) == len(case.batches) // case.read_every
        for x, y in zip(a, b):
            assert x.upto == y.upto and x.counters == y.counters
            assert all(x.values[k] == y.values[k] or (math.isnan(x.values[k])
                       and math.isnan(y.values[k])) for k in x.values), case.name
        tester.assert_agree(case, a, world=2, functional_every=None)
        # the global values are not rank 0's own window's (the comparison can tell)
        assert tester.check(case, a, world=1, functional_every=None), case.name
        z, y, _ = tester.window_rows(case, a[-1].upto, world=2)
        single = tester.publish_once(case, z.astype(np.float32), y, 2 * case.window)
        deficient = tester.rank_deficient(z[np.isfinite(z).all(axis=1)])
        for key in tester.signals(case):
            got, want = a[-1].values[key], single.values[key]
            assert tester.tolerance(case, key, deficient).ok(got, want), (case.name, key, got,
                                                                           want)

"""The ONNX backend's large-d path: a Gaussian sketch of the rows above ``sketch_above``, by the
in-process rule and options, and its memory estimate (:meth:`OnnxBackend.stream_bytes`).

Measured on the 2-core CPU test machine (CPU execution provider; peak RSS, ``VmHWM``, minus its
value after the imports and the backend's creation: ``ru_maxrss`` is the same counter but, in a
child, starts at the parent's RSS; window 512 filled by 4 batches of 128 rows, then a publish),
MiB, estimate = ``stream_bytes + batch_bytes``:

=====================  ==========  ========  =====
d (path)               estimate    measured  ratio
=====================  ==========  ========  =====
1024 (exact)           90          71        0.79
2048 (exact)           260         215       0.83
4096 (exact)           888         856       0.96
8192 (sketch, k 2048)  349         293       0.84
=====================  ==========  ========  =====

Before the sketch, a stream of d = 8192 held an 8192² float64 ``S`` and the kernel's 8192²
``ΔS`` per batch: with the default window (8192), two batches of one row grew the peak RSS by
1.5 GiB, their publish to 3.0 GiB, and took 96 s (``eigvalsh`` of 8192²); sketched: 141 MiB,
240 MiB and ~3 s.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from monitor.functional.qscore_window import nan_quantile, qscore_rows  # noqa: E402
from monitor.functional.sketch import second_moment_eigenvalues  # noqa: E402
from monitor.functional.spectral import (  # noqa: E402
    participation_ratio_from_moments,
    rankme_from_singular_values,
)
from monitor.sidecar.onnx_backend import NumpyStream, OnnxBackend, sketch_rows  # noqa: E402
from monitor.sidecar.service import SidecarConfig, TorchBackend  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NOT_IN_ONNX = {"qscore_auprc", "qscore_misclassified_ratio"}
"""AUPRC needs predictions, which the ONNX backend does not score (its module docstring)."""


def _backend(window: int = 512, **options: object) -> OnnxBackend:
    return OnnxBackend(SidecarConfig(every=1 << 20, window=window, device="cpu",
                                     monitor_options=dict(options)))


def _low_rank(rng: np.random.Generator, n: int, d: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of rank ``r``: gaussian (n, r) with unequal scales @ a random (r, d) mix."""
    mix = rng.standard_normal((r, d))
    rows = (rng.standard_normal((n, r)) * np.linspace(1.0, 3.0, r)) @ mix
    return rows.astype(np.float32), mix


def test_a_sketched_stream_reads_a_low_rank_window_like_the_exact_path() -> None:
    """d = 6000 > sketch_above: k = 2048; a rank-32 window reads RankMe ≈ 32-ish and PR as the
    exact values (computed here in numpy on the window's rows), and the exact counters."""
    d, r, window = 6000, 32, 512
    rng = np.random.default_rng(0)
    rows, mix = _low_rank(rng, 3 * 256, d, r)
    rows[5, 7] = np.nan                          # non-finite rows: two before the window,
    rows[6, 1] = np.inf
    rows[300] = -np.inf                          # one in it
    backend = _backend(window)
    for i in range(3):
        backend.ingest("r", "wide", rows[i * 256:(i + 1) * 256], None, 1)
    snap = backend.publish(backend._runs["r"])
    v = snap.streams["wide"]
    assert v["spectral_sketch_dim"] == 2048 and v["embedding_dim"] == d
    win = np.delete(rows[-window:], 300 - 256, axis=0)   # the window's valid rows (511)
    lam = second_moment_eigenvalues(win.astype(np.float64))
    n = window - 1
    exact_rank = float(rankme_from_singular_values(np.sqrt(lam), min(n, d)))
    q, _ = np.linalg.qr(mix.T)                   # orthonormal basis of the rows' span (d, r)
    y = win.astype(np.float64) @ q               # same S eigenvalues, traces and PR as (n, d)
    exact_pr = float(participation_ratio_from_moments(y.T @ y, y.sum(0), n))
    assert 25 < exact_rank <= 32
    assert v["effective_rank"] == pytest.approx(exact_rank, rel=0.02)
    assert v["participation_ratio"] == pytest.approx(exact_pr, rel=0.03)
    assert v["srank"] == 32
    assert v["window_samples"] == n
    assert snap.counters["wide"] == {"samples": 3 * 256 - 3, "nonfinite_values": d + 2}
    assert v["negative_values_ratio"] == pytest.approx(float((win < 0).mean()), rel=1e-12)
    ref_q = qscore_rows(rows[-window:])          # Q-Score of the ORIGINAL rows (one NaN)
    assert v["qscore_p50"] == pytest.approx(float(nan_quantile(ref_q, 0.5)), rel=1e-9)
    assert v["qscore_p10"] == pytest.approx(float(nan_quantile(ref_q, 0.1)), rel=1e-9)
    hist = snap.histograms["qscore"]["wide"]
    assert hist.count == 3 * 256 - 3            # finite scores of every valid row seen
    s = backend._runs["r"].streams["wide"]
    assert s.ring.shape == (window, 2048) and s.s.shape == (2048, 2048)


def test_a_publish_at_8192_allocates_no_d_by_d_array() -> None:
    """Two streams of d = 8192 (one row per batch, as the reported POSTs): the window state is
    k×k, Ω (d, k) is drawn once and shared, nothing of d×d exists."""
    d, k = 8192, 2048
    rng = np.random.default_rng(1)
    backend = _backend(window=64)
    for step in (1, 2):
        for name in ("a", "b"):
            backend.ingest("r", name, rng.standard_normal((1, d), dtype=np.float32), None, step)
    snap = backend.publish(backend._runs["r"])
    a, b = (backend._runs["r"].streams[n] for n in ("a", "b"))
    assert a.omega is b.omega and a.omega.shape == (d, k) and not a.omega.flags.writeable
    for s in (a, b):
        arrays = {name: x for name, x in vars(s).items() if isinstance(x, np.ndarray)}
        assert arrays["s"].shape == (k, k) and arrays["ring"].shape == (64, k)
        big = {name: x.shape for name, x in arrays.items() if name != "omega" and x.size >= d * d}
        assert not big
        held = sum(x.nbytes for name, x in arrays.items() if name != "omega")
        assert held < 8 * k * k + (1 << 20)
    assert snap.streams["a"]["window_samples"] == 2
    assert snap.streams["a"]["spectral_sketch_dim"] == k
    # Ω is freed with the last stream of its d (a weak cache), and drawn again the same way
    again = backend.omega(d, k)
    assert again is a.omega
    backend.close()
    del a, b, s, arrays, again
    assert (d, k, 0) not in backend._omegas


_RSS = """
import json, resource, sys
import numpy as np
from monitor.sidecar.onnx_backend import OnnxBackend
from monitor.sidecar.service import SidecarConfig

def peak():
    # VmHWM: this process's own peak RSS (getrusage's ru_maxrss, the same counter, also holds
    # the RSS of the parent at the fork, e.g. a large pytest process)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024

dim, window, batch, batches = (int(a) for a in sys.argv[1:5])
rng = np.random.default_rng(0)
data = [rng.standard_normal((batch, dim), dtype=np.float32) for _ in range(batches)]
backend = OnnxBackend(SidecarConfig(every=1 << 20, window=window, device="cpu"))
estimate = backend.stream_bytes(dim) + backend.batch_bytes(batch, dim)
base = peak()
for x in data:
    backend.ingest("r", "s", x, None, 1)
after_batches = peak() - base
snap = backend.publish(backend._runs["r"])
print(json.dumps({"estimate": estimate, "k": snap.streams["s"]["spectral_sketch_dim"],
                  "after_batches": after_batches, "measured": peak() - base,
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "window_samples": snap.streams["s"]["window_samples"]}))
"""


def _measure(dim: int, window: int, batch: int, batches: int, timeout: float = 240
             ) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", _RSS, *map(str, (dim, window, batch, batches))],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_single_rows_at_8192_stay_far_below_the_exact_footprint() -> None:
    """The reported case with the default window (8192): two batches of one 1×8192 row and a
    publish. It was ~2.1 GiB of peak RSS (and ~80 s of publish); the sketch holds Ω (64 MiB),
    a 2048² S and a window of 2048-dim rows."""
    got = _measure(8192, 8192, 1, 2)
    assert got["k"] == 2048 and got["window_samples"] == 2
    assert got["after_batches"] < 600 * 2**20, got
    assert got["measured"] < 600 * 2**20, got


@pytest.mark.parametrize("dim,k", [
    (1024, 0), (2048, 0),
    pytest.param(4096, 0, marks=pytest.mark.slow),     # an 4096² eigvalsh: ~10-30 s here
    (8192, 2048),
])
def test_stream_bytes_matches_the_measured_peak(dim: int, k: int) -> None:
    """``stream_bytes + batch_bytes`` against the peak RSS of a fresh process that fills a
    window of 512 rows (4 batches of 128) and publishes: never under by more than 25 %, never
    over by more than a factor 2 (numbers: module docstring)."""
    got = _measure(dim, 512, 128, 4)
    assert got["k"] == k and got["window_samples"] == 512
    assert got["measured"] <= 1.25 * got["estimate"], got
    assert got["measured"] >= 0.5 * got["estimate"], got


def test_stream_bytes_follows_the_rule_and_the_shared_omega() -> None:
    backend = _backend(window=1024)
    exact = backend.stream_bytes(4096)
    sketched = backend.stream_bytes(8192)
    assert sketched < exact and sketched < 8 * 8192 ** 2   # the exact 8192² S alone: 512 MiB
    assert backend.stream_bytes(8192) == sketched
    omega = backend.omega(8192, 2048)
    assert backend.stream_bytes(8192) == sketched - omega.nbytes   # Ω held: not counted again
    big = _backend(window=1024, spectral_path="exact")
    assert big.stream_bytes(8192) > 5 * 8 * 8192 ** 2
    assert backend.batch_bytes(256, 8192) < backend.batch_bytes(256, 4096)
    assert backend.batch_bytes(0, 64) == 0


def test_the_rule_and_its_options_are_the_in_process_ones() -> None:
    b = _backend()
    assert (b.spectral_path, b.sketch_above, b.sketch_dim, b.memory_limit_bytes, b.seed) == (
        "auto", 4096, 2048, None, 0)                       # MonitorConfig's defaults
    assert [b.sketch_dim_for(d) for d in (2048, 4096, 4097)] == [0, 0, 2048]
    b = _backend(spectral_path={"*": "exact", "wide": "sketch"}, sketch_dim=16,
                 memory_limit_bytes=1 << 20, seed=3)
    assert b.sketch_dim_for(9000) == 0 and b.sketch_dim_for(64, "wide") == 16
    assert b.sketch_dim_for(16, "wide") == 0                # no sketch at d <= k
    b = _backend(sketch_dim=16, memory_limit_bytes=1 << 20)
    assert b.sketch_dim_for(300) == 16 and b.sketch_dim_for(100) == 0   # 8·300² > 1 MiB
    assert _backend(spectral_path="sketch", sketch_dim=8).sketch_dim_for(9) == 8
    for bad in ({"spectral_path": "fast"}, {"spectral_path": {"*": "nope"}},
                {"sketch_dim": 1}, {"sketch_above": 0}, {"seed": -1},
                {"memory_limit_bytes": 0}, {"memory_limit_bytes": True}):
        with pytest.raises(ValueError):
            _backend(**bad)


def test_non_finite_and_overflowing_rows_are_invalid_like_the_kernel_makes_them() -> None:
    """Non-finite original rows (NaN, ±Inf, one Inf among finite values) and a finite row whose
    float32 projection overflows: NaN rows to the kernel, so zero rows in the ring, validity 0,
    out of every sum; counts and Q-Scores of the original rows."""
    d, k = 40, 16
    rng = np.random.default_rng(2)
    backend = _backend(window=64, spectral_path="sketch", sketch_dim=k)
    x = rng.standard_normal((12, d)).astype(np.float32)
    x[1] = np.nan
    x[2, 3] = np.inf
    x[3] = -np.inf
    x[4, :] = 3e38                          # finite, but x Ω overflows float32
    x[5] = 0.0                              # a zero row: valid
    omega = backend.omega(d, k)
    y, valid, nonfinite, neg, q = sketch_rows(x, omega)
    assert valid.tolist() == [True, False, False, False, False] + [True] * 7
    assert np.isnan(y[~valid]).all() and np.isfinite(y[valid]).all()
    assert nonfinite == d + 1 + d
    assert np.isnan(q[1:4]).all() and np.isfinite(q[4]) and np.isfinite(q[valid]).all()
    np.testing.assert_array_equal(neg[valid], (x[valid] < 0).sum(1))
    backend.ingest("r", "s", x, None, 1)
    s = backend._runs["r"].streams["s"]
    assert s.ring_valid[:12].tolist() == valid.astype(float).tolist()
    assert not s.ring[:12][~valid].any()
    ref = x[valid].astype(np.float32) @ omega                      # the valid rows' sketch
    np.testing.assert_allclose(s.s, ref.T.astype(np.float64) @ ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(s.zsum, ref.sum(0), rtol=1e-5, atol=1e-5)
    assert s.n == valid.sum() and s.nonfinite == 2 * d + 1
    v = backend.publish(backend._runs["r"]).streams["s"]
    assert v["negative_values_ratio"] == pytest.approx((x[valid] < 0).sum() / (valid.sum() * d))
    assert all(math.isfinite(v[key]) for key in ("effective_rank", "participation_ratio",
                                                 "embedding_std_ratio"))


def _names_and_values(cls: type, batches: list[np.ndarray], labels: bool = False,
                      **options: object) -> tuple[dict[str, float], dict[str, float]]:
    config = SidecarConfig(every=2, window=128, device="cpu",
                           monitor_options={"peak_warmup": 1, **options})
    backend = cls(config)
    for step, x in enumerate(batches, 1):
        y = (np.arange(x.shape[0]) % 3).astype(np.int64) if labels else None
        backend.ingest("r", "s", x, y, step)
    snap = backend.history("r")[-1]
    backend.close()
    return snap.streams["s"], snap.counters["s"]


@pytest.mark.parametrize("options", [
    {"spectral_path": "sketch", "sketch_dim": 16},
    {"spectral_path": {"*": "exact", "s": "sketch"}, "sketch_dim": 16},
    {"sketch_above": 32, "sketch_dim": 16},
    {"spectral_path": "exact"},
], ids=["sketch", "per-stream", "auto above", "exact"])
def test_the_backends_export_the_same_names(options: dict[str, object]) -> None:
    """A sketched (or exact) stream of d = 48 in both backends: the same signal names (AUPRC
    aside), the same exact signals; the sketched spectral ones differ (each backend draws its
    own Ω: numpy's generator here, torch's in process) but read the same rank-6 window."""
    rng = np.random.default_rng(4)
    mix = rng.standard_normal((6, 48))
    batches = [np.maximum(rng.standard_normal((40, 6)) @ mix, -0.5).astype(np.float32)
               for _ in range(7)]
    batches[2][3, 5] = np.nan
    onnx, onnx_counts = _names_and_values(OnnxBackend, batches, **options)
    torch_, torch_counts = _names_and_values(TorchBackend, batches, **options)
    assert set(onnx) == set(torch_) - NOT_IN_ONNX
    assert onnx_counts == torch_counts
    sketched = options.get("spectral_path", "auto") != "exact"
    assert onnx["spectral_sketch_dim"] == torch_["spectral_sketch_dim"] == (16 if sketched else 0)
    exact_keys = ("window_samples", "embedding_dim", "negative_values_ratio", "qscore_p10",
                  "qscore_p50", "qscore_threshold", "low_quality_samples_ratio")
    for key in exact_keys:
        assert onnx[key] == pytest.approx(torch_[key], rel=1e-9, nan_ok=True), key
    # sketched: RankMe of a rank-6 window is robust to Ω; PR at k = 16 is not (tested at k =
    # 2048 above)
    for key in ("effective_rank", "srank") + (() if sketched else ("participation_ratio",)):
        assert onnx[key] == pytest.approx(torch_[key], rel=0.1 if sketched else 1e-6), key


def test_labels_on_a_sketched_stream_use_the_sketched_rows() -> None:
    """Neural collapse on a sketched stream reads the k-dim projected rows (module docstring):
    the same NC names as in-process (which reads the original rows), the counts exact, NC2
    close; NC1 larger than the original rows' (about 1-2 × d/k: the projection spreads the
    within-class scatter over the class-mean directions)."""
    rng = np.random.default_rng(5)
    means = 4.0 * rng.standard_normal((3, 48))
    batches = [(means[np.arange(40) % 3] + 0.3 * rng.standard_normal((40, 48))
                ).astype(np.float32) for _ in range(5)]
    opts = {"spectral_path": "sketch", "sketch_dim": 24, "max_classes": 3}
    onnx, _ = _names_and_values(OnnxBackend, batches, labels=True, **opts)
    torch_, _ = _names_and_values(TorchBackend, batches, labels=True, **opts)
    assert {k for k in onnx if k.startswith("neural_collapse")} == {
        k for k in torch_ if k.startswith("neural_collapse")} - {"neural_collapse_nc3",
                                                                 "neural_collapse_nc4"}
    for key in ("neural_collapse_classes", "neural_collapse_window_samples"):
        assert onnx[key] == torch_[key]
    nc1, ref = onnx["neural_collapse_nc1"], torch_["neural_collapse_nc1"]
    assert ref < nc1 < 4 * (48 / 24) * ref
    assert onnx["neural_collapse_nc2_equinorm"] == pytest.approx(
        torch_["neural_collapse_nc2_equinorm"], abs=0.1)


def test_an_exact_stream_is_unchanged_by_the_sketch_options() -> None:
    """The exact path is the kernel's as before; its negatives per row now come from the ring's
    side array (no (window, d) copy at publish): the same ratio as counting the ring."""
    rng = np.random.default_rng(6)
    backend = _backend(window=64)
    for step in (1, 2, 3):
        backend.ingest("r", "s", rng.standard_normal((40, 8), dtype=np.float32), None, step)
    s: NumpyStream = backend._runs["r"].streams["s"]
    v = backend.publish(backend._runs["r"]).streams["s"]
    valid = s.ring_valid > 0
    assert s.omega is None and s.width == 8 and v["spectral_sketch_dim"] == 0
    assert v["negative_values_ratio"] == (s.ring[valid] < 0).sum() / (valid.sum() * 8)


def test_io_binding_runs_the_sketched_path_like_the_plain_kernel() -> None:
    """With I/O binding (sums kept as ONNX Runtime values; here on the CPU) a sketched stream
    publishes what the plain path does, across wraps and an exact rebuild."""
    rng = np.random.default_rng(8)
    batches = [rng.standard_normal((24, 40)).astype(np.float32) for _ in range(12)]
    batches[3][2] = np.nan

    def run(io_binding: bool) -> dict[str, float]:
        config = SidecarConfig(every=1 << 20, window=64, device="cpu", io_binding=io_binding,
                               monitor_options={"spectral_path": "sketch", "sketch_dim": 16})
        backend = OnnxBackend(config)
        for i, x in enumerate(batches):
            backend.ingest("r", "s", x, None, 1)
            if i == 0:
                backend._runs["r"].streams["s"].cursor.rebuild_every_wraps = 2
        assert backend._runs["r"].streams["s"].cursor.wraps >= 4
        return backend.publish(backend._runs["r"]).streams["s"]

    plain, bound = run(False), run(True)
    assert plain["spectral_sketch_dim"] == 16
    for key, ref in plain.items():
        assert bound[key] == pytest.approx(ref, rel=1e-9, abs=1e-12, nan_ok=True), key

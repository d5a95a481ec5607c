"""The Monitor's wider signal set end to end: activations, labels, Q-Score, pairs, weights.

Each value that reaches a Snapshot is recomputed independently (numpy, scikit-learn, or the
one-shot functions on the very rows the monitor saw) and the Prometheus text is checked.
"""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from sklearn.metrics import average_precision_score
from torch import nn

from exporters.prometheus import make_registry, render
from monitor import Monitor
from monitor.alerts import DEFAULT_RULES, LOW_QUALITY_SAMPLES
from monitor.functional.generative import diversity_ratio
from monitor.functional.neural_collapse import nc1
from monitor.functional.qscore import qscore


def _half_dead_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        net[0].bias[:16] = -1e3            # units 0..15 never fire
    return net


def test_activation_layer_signals_match_numpy() -> None:
    net = _half_dead_mlp()
    mon = Monitor(port=None, every=1000, window=1024, max_rows=512, qscore=False)
    mon.watch_activations(net)
    gen = torch.Generator().manual_seed(1)
    seen = []
    for _ in range(3):
        x = torch.randn(200, 12, generator=gen)
        seen.append(torch.relu(net[0](x)).detach())
        net(x)
        mon.step()
    snap = mon.publish()
    h = torch.cat(seen).double().numpy()
    mean_abs = np.abs(h).mean(0)
    score = mean_abs / (mean_abs.mean() + 1e-9)
    for tau in (0.0, 0.025, 0.1):
        assert snap.get("dormant_units_ratio", layer="1", tau=tau) == pytest.approx(
            float((score <= tau).mean()))
    assert snap.get("never_active_units_ratio", layer="1") == pytest.approx(0.5)
    assert snap.get("activation_units", layer="1") == 32
    s = np.linalg.svd(h, compute_uv=False)
    p = s / s.sum() + 1e-7
    assert snap.get("effective_rank", layer="1") == pytest.approx(
        float(np.exp(-(p * np.log(p)).sum())), rel=1e-6)
    text = render(make_registry(lambda: [snap])).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    taus = {s.labels["tau"] for s in fams["repwatch_dormant_units_ratio"].samples}
    assert taus == {"0", "0.025", "0.1"}
    assert fams["repwatch_activation_effective_rank"].samples[0].labels["layer"] == "1"


def test_interval_statistics_reset_after_publish() -> None:
    """Dormancy is measured over each publish interval: units that die later show up."""
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    mon = Monitor(port=None, every=2, window=256, max_rows=64, qscore=False)
    mon.watch_activations(net)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        net(torch.randn(64, 8, generator=gen))
        mon.step()
    before = mon.latest.get("dormant_units_ratio", layer="1", tau=0.0)
    with torch.no_grad():
        net[0].bias[:8] = -1e3
    for _ in range(2):
        net(torch.randn(64, 8, generator=gen))
        mon.step()
    after = mon.latest.get("dormant_units_ratio", layer="1", tau=0.0)
    assert before < 0.25 and after >= 0.5
    assert mon.latest.get("never_active_units_ratio", layer="1") < 0.25  # they fired before


def _labelled_run(max_rows: int) -> tuple[float, float, float]:
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    enc = nn.Linear(10, 6)
    centres = 3.0 * torch.randn(3, 10, generator=gen)
    mon = Monitor(port=None, every=1000, window=2048, max_rows=max_rows, qscore=False, seed=5)
    mon.watch(enc, name="enc")
    rows, labels = [], []
    for _ in range(4):
        y = torch.randint(0, 3, (100,), generator=gen)
        x = torch.randn(100, 10, generator=gen) + centres[y]
        rows.append(enc(x).detach())
        labels.append(y)
        mon.step(labels=y)
    snap = mon.publish()
    shuffled = torch.cat(labels)[torch.randperm(400, generator=gen)]
    return (snap.get("neural_collapse_nc1", stream="enc"),
            float(nc1(torch.cat(rows).double(), torch.cat(labels))),
            float(nc1(torch.cat(rows).double(), shuffled)))


def test_step_labels_give_neural_collapse_of_the_captured_rows() -> None:
    got, full, misaligned = _labelled_run(max_rows=100)      # no subsampling: exact
    assert got == pytest.approx(full, rel=1e-9)
    assert full < 0.5 < misaligned                           # the check can tell alignment
    got_sub, full_sub, _ = _labelled_run(max_rows=40)       # subsampled rows keep their labels
    assert full_sub == full
    assert got_sub == pytest.approx(full, rel=0.5)


def test_evaluation_stream_auprc_matches_sklearn() -> None:
    gen = torch.Generator().manual_seed(4)
    mon = Monitor(port=None, every=1000, window=4096, max_rows=512)
    zs, ys, ps = [], [], []
    for _ in range(3):
        z = torch.relu(torch.randn(300, 32, generator=gen))
        y = torch.randint(0, 5, (300,), generator=gen)
        p = torch.where(torch.rand(300, generator=gen) < 0.3,
                        torch.randint(0, 5, (300,), generator=gen), y)
        mon.observe("eval", z, labels=y, predictions=p)
        zs.append(z)
        ys.append(y)
        ps.append(p)
    snap = mon.publish()
    q = qscore(torch.cat(zs)).numpy()
    wrong = (torch.cat(ys) != torch.cat(ps)).numpy()
    assert snap.get("qscore_auprc", stream="eval") == pytest.approx(
        average_precision_score(wrong, -q), rel=1e-9)
    assert snap.get("qscore_misclassified_ratio", stream="eval") == pytest.approx(wrong.mean())
    hist = snap.histograms["qscore"]["eval"]
    assert hist.count == 900 and hist.cumulative[-1] == 900
    assert hist.cumulative == sorted(hist.cumulative)


def test_sample_scores_follow_the_subsampled_rows() -> None:
    mon = Monitor(port=None, every=1000, window=1024, max_rows=16, seed=9)
    z = torch.relu(torch.randn(64, 20, generator=torch.Generator().manual_seed(5)))
    mon.observe("z", z)
    scores, index = mon.sample_scores("z")
    assert scores.shape == (16,) and index.shape == (16,)
    assert len(set(index.tolist())) == 16
    torch.testing.assert_close(scores.double(), qscore(z[index]).double())
    with pytest.raises(KeyError, match="no stream"):
        mon.sample_scores("nope")


def test_pair_diversity_ratio() -> None:
    gen = torch.Generator().manual_seed(6)
    mon = Monitor(port=None, every=1000, window=1024, max_rows=256, qscore=False)
    mon.pair("fake", "real", reservoir=256)
    real = torch.randn(256, 2, generator=gen)
    fake = 0.1 * torch.randn(256, 2, generator=gen) + 1.0
    mon.observe("real", real)
    mon.observe("fake", fake)
    snap = mon.publish()
    assert snap.get("generator_diversity_ratio", stream="fake") == pytest.approx(
        float(diversity_ratio(fake, real)), rel=1e-9)
    assert snap.get("generator_diversity_ratio", stream="fake") < 0.2
    assert snap.get("generator_effective_rank_ratio", stream="fake") == pytest.approx(
        snap.get("effective_rank", stream="fake") / snap.get("effective_rank", stream="real"))
    with pytest.raises(ValueError, match="different"):
        mon.pair("a", "a")
    resumed = Monitor(port=None, every=1000, window=1024, max_rows=256, qscore=False)
    resumed.load_state_dict(mon.state_dict())
    resumed.pair("fake", "real", reservoir=256)            # re-registering keeps the state
    assert resumed.publish().get("generator_diversity_ratio", stream="fake") == pytest.approx(
        snap.get("generator_diversity_ratio", stream="fake"), rel=1e-12)


def test_weight_signals() -> None:
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    mon = Monitor(port=None, every=1, window=64, max_rows=32, qscore=False)
    mon.watch_weights(net, rank_every=1, earlybird=(0.5,))
    before = net[0].weight.detach().clone()
    snaps = []
    for _ in range(2):
        loss = net(torch.randn(16, 6)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        snaps.append(mon.step())
        if len(snaps) == 1:
            before = net[0].weight.detach().clone()
    snap = snaps[-1]
    w = net[0].weight.detach().double()
    assert snap.get("weight_norm", param="0.weight") == pytest.approx(float(w.norm()))
    assert snap.get("weight_abs_mean", param="0.weight") == pytest.approx(float(w.abs().mean()))
    assert snap.get("grad_norm", param="0.weight") == pytest.approx(
        float(net[0].weight.grad.double().norm()))
    assert snap.get("update_to_weight_ratio", param="0.weight") == pytest.approx(
        float((w - before.double()).norm() / before.double().norm()))
    assert snap.get("weight_rank", param="0.weight") == np.linalg.matrix_rank(
        w.numpy() / np.linalg.norm(w.numpy()), tol=1e-3)
    assert "0.bias" not in snap.params
    assert math.isfinite(snap.get("earlybird_mask_distance", sparsity=0.5))


@pytest.mark.e2e
def test_everything_exports_and_passes_promtool(promtool: str) -> None:
    net = _half_dead_mlp()
    mon = Monitor(port=None, every=1000, window=512, max_rows=128)
    mon.watch(net[0], name="hidden")
    mon.watch_activations(net)
    mon.watch_weights(net, rank_every=1)
    mon.pair("fake", "real")
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        x = torch.randn(128, 12, generator=gen)
        net(x)
        mon.observe("real", torch.randn(64, 3, generator=gen))
        mon.observe("fake", torch.randn(64, 3, generator=gen))
        mon.step(labels=torch.randint(0, 4, (128,), generator=gen))
    snap = mon.publish()
    text = render(make_registry(lambda: [snap]))
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    names = {f.name for f in text_string_to_metric_families(text.decode())}
    for name in ("repwatch_dormant_units_ratio", "repwatch_weight_norm", "repwatch_qscore",
                 "repwatch_low_quality_samples_ratio", "repwatch_neural_collapse_nc1",
                 "repwatch_generator_diversity_ratio", "repwatch_activation_effective_rank"):
        assert name in names, name
    assert snap.errors == {}


def test_state_dict_keeps_layers_and_labels() -> None:
    net = _half_dead_mlp()
    a = Monitor(port=None, every=1000, window=256, max_rows=64)
    a.watch_activations(net)
    a.observe("z", torch.randn(64, 5), labels=torch.randint(0, 3, (64,)))
    net(torch.randn(64, 12))
    b = Monitor(port=None, every=1000, window=256, max_rows=64)
    b.load_state_dict(a.state_dict())
    sa, sb = a.publish(), b.publish()
    assert sa.layers.keys() == sb.layers.keys() == {"1"}
    assert sb.get("neural_collapse_nc1", stream="z") == pytest.approx(
        sa.get("neural_collapse_nc1", stream="z"))
    assert sb.get("never_active_units_ratio", layer="1") == pytest.approx(0.5)


def test_bad_label_input_is_counted_not_raised() -> None:
    enc = nn.Linear(4, 4)
    mon = Monitor(port=None, every=1000, window=64, max_rows=64)
    mon.watch(enc, name="enc")
    enc(torch.randn(8, 4))
    mon.step(labels=torch.zeros(5, dtype=torch.long))       # wrong length
    assert mon.publish().errors.get("labels") == 1
    with pytest.raises(ValueError, match=r"expected shape \(8,\)"):
        Monitor(port=None, window=64, max_rows=64, strict=True).observe(
            "z", torch.randn(8, 4), labels=torch.zeros(3, dtype=torch.long))
    mon2 = Monitor(port=None, window=64, max_rows=64)
    with pytest.raises(TypeError, match="Module"):
        mon2.watch_activations("not a model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no submodule"):
        mon2.watch_activations(enc, names=["missing"])


def _qscore_shift(signed: bool) -> list[str]:
    """Sparse non-negative features (a few strong units per sample), then dense ones that
    spread their mass over many units: Q-Score falls for most samples."""
    gen = torch.Generator().manual_seed(10)
    mon = Monitor(port=None, every=1, window=512, max_rows=256, peak_warmup=0,
                  rules=(*DEFAULT_RULES, LOW_QUALITY_SAMPLES))   # opt-in (docs/detection.md)
    fired: list[str] = []
    mon.on_alert(lambda a: fired.append(f"{a.name}/{a.stream}"))
    protos = torch.zeros(8, 64)
    protos[torch.arange(8), torch.arange(8) * 8] = 10.0
    for step in range(12):
        y = torch.randint(0, 8, (256,), generator=gen)
        noise = torch.rand(256, 64, generator=gen) * (0.1 if step < 4 else 3.0)
        z = protos[y] + noise
        mon.observe("feat", z - 1.0 if signed else z)
        mon.step()
    assert mon.latest is not None
    ratio = mon.latest.get("low_quality_samples_ratio", stream="feat")
    assert ratio > 0.5, ratio
    return fired


def test_low_quality_alert_fires_on_nonnegative_features_only() -> None:
    assert "RepwatchLowQualitySamples/feat" in _qscore_shift(signed=False)
    assert "RepwatchLowQualitySamples/feat" not in _qscore_shift(signed=True)


def test_curvature_probe_publishes_the_top_hessian_eigenvalue() -> None:
    """Quadratic loss ½ xᵀAx: the probe's eigenvalue equals numpy's largest eigenvalue of A, and
    with lr < 2/λ the sampled Lyapunov exponent is negative (stable)."""
    gen = torch.Generator().manual_seed(11)
    m = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    a = m @ m.T + torch.eye(6, dtype=torch.float64)
    x = nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64))
    mon = Monitor(port=None, every=5, window=64, max_rows=32)
    mon.watch_curvature([x], every=1, power_iters=200)
    lam = float(np.linalg.eigvalsh(a.numpy())[-1])
    for _ in range(10):
        mon.probe_curvature(lambda: 0.5 * x @ a @ x, lr=0.5 / lam)
        snap = mon.step()
    assert snap is not None
    assert snap.get("hessian_top_eigenvalue") == pytest.approx(lam, rel=1e-3)  # power-iteration tol
    assert snap.get("sgd_lyapunov_exponent") == pytest.approx(math.log(0.5), abs=0.01)
    assert snap.get("sgd_lyapunov_exponent") < 0
    assert snap.run_signals["curvature_samples"] == 10


def test_neural_collapse_effective_depth() -> None:
    """Three labelled streams in watch order; only the second is class-collapsed: depth 2."""
    gen = torch.Generator().manual_seed(12)
    centres = 5.0 * torch.randn(4, 16, generator=gen)
    mon = Monitor(port=None, every=1000, window=1024, max_rows=256, qscore=False,
                  nc1_depth_threshold=0.1)
    for _ in range(3):
        y = torch.randint(0, 4, (256,), generator=gen)
        mon.observe("layer1", torch.randn(256, 16, generator=gen), labels=y)
        mon.observe("layer2", centres[y] + 0.05 * torch.randn(256, 16, generator=gen), labels=y)
        mon.observe("layer3", centres[y] + 0.05 * torch.randn(256, 16, generator=gen), labels=y)
    snap = mon.publish()
    assert snap.get("neural_collapse_nc1", stream="layer1") > 0.1
    assert snap.get("neural_collapse_nc1", stream="layer2") < 0.01
    assert snap.get("neural_collapse_effective_depth") == 2


def test_early_bird_notice_fires_once_the_mask_is_stable() -> None:
    """Weights that stop changing give mask distance 0 at every check: after `patience` (5)
    checks below 0.1 the info notice fires; weights redrawn at every check never settle."""
    def run(redraw: bool) -> list[str]:
        torch.manual_seed(13)
        net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
        mon = Monitor(port=None, every=1, window=64, max_rows=32, qscore=False)
        mon.watch_weights(net, rank_every=1, earlybird=(0.5, 0.8))
        fired: list[str] = []
        mon.on_alert(lambda a: fired.append(f"{a.name}/{a.scope}"))
        for _ in range(9):
            if redraw:
                for layer in (net[0], net[2]):
                    layer.reset_parameters()
            mon.step()
        return fired

    assert run(redraw=False) == ["RepwatchEarlyBirdTicket/run"]
    assert run(redraw=True) == []

"""Scenario (Chen & He 2021): SimSiam without stop-gradient really collapses, and repwatch says so.

Trains the demo SimSiam on scikit-learn's digits. With the stop-gradient the run stays healthy
and no alert fires; without it the embeddings collapse (checked independently of repwatch with a
numpy SVD of the trained projector's outputs on the whole data set) and the collapse alerts fire
during the run.

Margins, measured on a 2-core AMD EPYC VM with one torch thread, seeds 0–4 (400 steps):
healthy projector RankMe 10.3–13.5 and √d·std 0.85–0.90 by numpy (asserted > 8 and > 0.5), no
alert, last std ratio 0.83–0.88; collapsed RankMe 1.04–1.12 and std ≤ 0.002 (asserted < 2 and
< 0.1), ``RepwatchRepresentationCollapse`` first at step 40–50; stop-gradient removed at step 200:
the projector's alerts fire at steps 250–280, none before.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monitor.tools.demo import DemoResult, run_demo
from monitor.tools.demo_model import load_digits_tensor
from tests.trained import SIMSIAM_STEPS as STEPS

pytestmark = pytest.mark.slow


def _numpy_health(z: np.ndarray) -> tuple[float, float]:
    """(RankMe, √d·std of L2-normalised rows) by numpy, independent of repwatch's code."""
    s = np.linalg.svd(z.astype(np.float64), compute_uv=False)
    p = s / s.sum() + 1e-7
    zn = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return float(np.exp(-(p * np.log(p)).sum())), float(zn.std(0, ddof=1).mean() * math.sqrt(z.shape[1]))


def _embed(model: torch.nn.Module) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        x = load_digits_tensor(next(model.parameters()).device)
        return model.projector(model.backbone(x)).cpu().numpy()


def test_healthy_run_does_not_alert(simsiam_healthy: DemoResult) -> None:
    healthy = simsiam_healthy
    assert healthy.fired == []
    last = healthy.snapshots[-1]
    assert last.alerts == []
    assert last.get("embedding_std_ratio", "projector") > 0.5
    assert healthy.model is not None
    rank, std = _numpy_health(_embed(healthy.model))
    assert rank > 8 and std > 0.5                     # really healthy, by an independent measure


def test_without_stop_gradient_collapse_alert_fires(simsiam_collapsed: DemoResult) -> None:
    collapsed = simsiam_collapsed
    assert collapsed.model is not None
    rank, std = _numpy_health(_embed(collapsed.model))
    assert rank < 2 and std < 0.1                     # the phenomenon itself, measured by numpy
    step = collapsed.first_fired("RepwatchRepresentationCollapse", "projector")
    assert step is not None and step < STEPS          # fired while the run was going
    last = collapsed.snapshots[-1]
    assert last.get("embedding_std_ratio", "projector") < 0.1
    assert any(a.name == "RepwatchRepresentationCollapse" for a in last.alerts)


def test_collapse_mid_run_is_caught_after_it_starts() -> None:
    result = run_demo(steps=STEPS, collapse_at=200, seed=1, device="cpu", port=None)
    fired = {a.name: s for s, a in result.fired if a.stream == "projector"}
    assert "RepwatchRepresentationCollapse" in fired
    assert all(step > 200 for step in fired.values())  # nothing before the stop-gradient went

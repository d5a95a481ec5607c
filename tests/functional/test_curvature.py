"""Curvature: HVP and power iteration on quadratics with a known Hessian (vs numpy), the
Lyapunov check values of docs/metrics.md §10, and the CurvatureProbe on stochastic quadratics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monitor.functional.curvature import hvp, lyapunov_exponent, top_hessian_eigenvalue
from monitor.probes.curvature import CurvatureProbe


def spd(d: int, eigs: list[float], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * np.asarray(eigs)) @ q.T


def quadratic(a: np.ndarray, split: int):  # type: ignore[no-untyped-def]
    """½ xᵀ A x with x split into two parameter tensors (tests the list handling)."""
    at = torch.from_numpy(a)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(a.shape[0], generator=g, dtype=torch.float64)
    p1 = x[:split].clone().requires_grad_(True)
    p2 = x[split:].clone().requires_grad_(True)

    def loss() -> torch.Tensor:
        z = torch.cat([p1, p2])
        return 0.5 * z @ at @ z

    return [p1, p2], loss


def test_hvp_equals_a_times_v() -> None:
    a = spd(7, [5.0, 3.0, 2.0, 1.0, 0.5, 0.1, -0.4], seed=0)
    params, loss = quadratic(a, 3)
    rng = np.random.default_rng(2)
    v = rng.normal(size=7)
    hv = hvp(loss, params, [torch.from_numpy(v[:3]), torch.from_numpy(v[3:])])
    np.testing.assert_allclose(torch.cat(hv).numpy(), a @ v, rtol=1e-12, atol=1e-12)
    # a non-quadratic loss: H of Σ x⁴/4 is diag(3x²)
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    hv = hvp(lambda: (x**4).sum() / 4, [x], [torch.ones(3, dtype=torch.float64)])
    np.testing.assert_allclose(hv[0].numpy(), 3 * np.array([1.0, 4.0, 0.25]), rtol=1e-12)


def test_top_eigenvalue_matches_eigvalsh() -> None:
    a = spd(12, [9.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.8, 0.5, 0.3, 0.1, 0.0], seed=3)
    params, loss = quadratic(a, 5)
    gen = torch.Generator().manual_seed(0)
    lam, v = top_hessian_eigenvalue(loss, params, iters=200, tol=1e-14, generator=gen)
    w, vec = np.linalg.eigh(a)
    assert float(lam) == pytest.approx(w[-1], rel=1e-10)
    vv = torch.cat(v).numpy()
    assert np.linalg.norm(vv) == pytest.approx(1.0, rel=1e-12)
    assert abs(vv @ vec[:, -1]) == pytest.approx(1.0, abs=1e-6)
    # 20 iterations (the default) already give the value to < 1 % with a 1.5× gap
    lam20, _ = top_hessian_eigenvalue(loss, params, generator=torch.Generator().manual_seed(1))
    assert float(lam20) == pytest.approx(w[-1], rel=1e-2)


def test_power_iteration_bad_input() -> None:
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="iters must be >= 1"):
        top_hessian_eigenvalue(lambda: (x**2).sum(), [x], iters=0)
    with pytest.raises(ValueError, match="does not require grad"):
        hvp(lambda: (x**2).sum(), [torch.zeros(3)], [torch.zeros(3)])
    with pytest.raises(ValueError, match=r"expected shape \(3,\), got \(2,\)"):
        hvp(lambda: (x**2).sum(), [x], [torch.zeros(2)])
    with pytest.raises(ValueError, match="scalar loss"):
        hvp(lambda: x**2, [x], [torch.zeros(3)])


def test_lyapunov_check_values() -> None:
    """docs/metrics.md §10: ĥ = 0.5 w.p. 0.7, 4.0 w.p. 0.3, η = 1 → Λ = −0.156; w.p. 0.45 for 4.0 → +0.113.
    Exact distributions (70 + 30 samples), and an online estimate from 5000 draws."""
    h = torch.tensor([0.5] * 70 + [4.0] * 30)
    assert float(lyapunov_exponent(h, lr=1.0)) == pytest.approx(-0.156, abs=5e-4)
    assert float(lyapunov_exponent(h, lr=1.0)) == pytest.approx(
        0.7 * math.log(0.5) + 0.3 * math.log(3.0), rel=1e-12)
    h = torch.tensor([0.5] * 55 + [4.0] * 45)
    assert float(lyapunov_exponent(h, lr=1.0)) == pytest.approx(0.113, abs=5e-4)
    gen = torch.Generator().manual_seed(0)
    draw = torch.where(torch.rand(5000, generator=gen) < 0.3, 4.0, 0.5)
    assert float(lyapunov_exponent(draw, lr=1.0)) == pytest.approx(-0.156, abs=0.03)
    # variance criterion disagrees: E[(1 − ηĥ)²] = 2.875 > 1 although Λ < 0
    assert float(((1 - draw.double()) ** 2).mean()) == pytest.approx(2.875, rel=0.05)
    # weight decay and preconditioner enter the factor
    assert float(lyapunov_exponent(torch.tensor([1.0]), lr=0.5, weight_decay=0.2)) == pytest.approx(
        math.log(abs(1 - 0.5 - 0.1)))
    assert float(lyapunov_exponent(torch.tensor([1.0]), lr=0.5, preconditioner=3.0)) == pytest.approx(
        math.log(0.5))
    assert math.isnan(float(lyapunov_exponent(torch.tensor([]), lr=1.0)))


def test_probe_on_stochastic_quadratic_matches_sampled_lyapunov() -> None:
    """Loss ½ c_t xᵀAx with a random per-batch scale c_t: ĥ_t = c_t λ_max along the top
    eigenvector, so Λ̂ must equal mean log|1 − η c_t λ_max| over the sampled steps."""
    a = spd(6, [2.0, 1.0, 0.5, 0.3, 0.2, 0.1], seed=4)
    at = torch.from_numpy(a)
    x = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(2),
                    requires_grad=True)
    probe = CurvatureProbe([x], every=3, power_iters=80, refresh_every=9, tol=1e-14)
    rng = np.random.default_rng(5)
    eta = 0.6
    logs = []
    results = []
    for step in range(30):
        c = float(rng.choice([0.25, 2.0], p=[0.6, 0.4]))
        out = probe.maybe_probe(step, lambda c=c: 0.5 * c * (x @ at @ x), lr=eta,
                                refresh_loss_fn=lambda: 0.5 * (x @ at @ x))
        if step % 3:
            assert out is None
            continue
        assert out is not None
        logs.append(math.log(abs(1 - eta * c * 2.0)))
        results.append(out)
    last = results[-1]
    assert last["curvature_samples"] == 10.0
    assert last["hessian_top_eigenvalue"] == pytest.approx(2.0, rel=1e-6)
    assert last["sgd_lyapunov_exponent"] == pytest.approx(float(np.mean(logs)), rel=1e-6)
    assert x.grad is None                                   # the probe does not touch .grad
    probe.reset()
    assert probe.compute()["curvature_samples"] == 0.0
    assert math.isnan(probe.compute()["sgd_lyapunov_exponent"])


def test_probe_on_a_small_network_matches_a_dense_hessian() -> None:
    """A tiny tanh network: the probe's top eigenvalue equals numpy's eigvalsh of the Hessian
    built column by column with torch.autograd.functional.hessian on the flat parameters."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(32, 3, generator=g, dtype=torch.float64)
    yb = torch.randn(32, 1, generator=g, dtype=torch.float64)
    w1 = (0.8 * torch.randn(4, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    w2 = (0.8 * torch.randn(1, 4, generator=g, dtype=torch.float64)).requires_grad_(True)

    def loss_flat(flat: torch.Tensor) -> torch.Tensor:
        a, b = flat[:12].view(4, 3), flat[12:].view(1, 4)
        return ((torch.tanh(xb @ a.T) @ b.T - yb) ** 2).mean()

    flat0 = torch.cat([w1.detach().reshape(-1), w2.detach().reshape(-1)])
    hess = torch.autograd.functional.hessian(loss_flat, flat0).numpy()
    eig = np.linalg.eigvalsh(hess)
    top = eig[np.argmax(np.abs(eig))]
    probe = CurvatureProbe([w1, w2], every=1, power_iters=300, tol=1e-12)
    out = probe.maybe_probe(0, lambda: loss_flat(torch.cat([w1.reshape(-1), w2.reshape(-1)])), lr=0.1)
    assert out is not None
    assert out["hessian_top_eigenvalue"] == pytest.approx(top, rel=1e-6)
    assert out["sgd_lyapunov_exponent"] == pytest.approx(math.log(abs(1 - 0.1 * top)), rel=1e-5)


def test_probe_bad_input() -> None:
    with pytest.raises(ValueError, match="every must be >= 1, got 0"):
        CurvatureProbe([torch.zeros(2, requires_grad=True)], every=0)
    with pytest.raises(ValueError, match="requires grad"):
        CurvatureProbe([torch.zeros(2)], every=1)

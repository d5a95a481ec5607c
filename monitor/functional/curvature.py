"""Loss curvature from Hessian-vector products, and the SGD Lyapunov exponent along a direction.

* :func:`hvp` — ``H v`` by double backward (Pearlmutter 1994): ``∇_θ ⟨∇_θ L, v⟩``.
* :func:`top_hessian_eigenvalue` — power iteration on HVPs: the sharpness tracked by Lyle et al.
  (ICML 2023, "Understanding plasticity in neural networks"; docs/metrics.md §7a).
* :func:`lyapunov_exponent` — ``Λ = mean_t log|1 − η ĥ_t − η λ_wd|`` for sampled minibatch
  curvatures ``ĥ_t = vᵀ Ĥ_{B_t} v`` along a fixed direction v. In the rank-1 / commuting
  linearisation of SGD around a fixed point (Ziyin, Li, Galanti & Ueda, arXiv 2303.13093,
  "Probabilistic stability of stochastic gradient descent"), ``δ_{t+1} = (1 − η ĥ_t) δ_t`` and
  SGD is stable *in probability* iff ``Λ < 0``, while L2 stability needs
  ``E[(1 − η ĥ)²] < 1``. **This scalar, sampled estimator is a design of docs/metrics.md §10 [D],
  not code from the paper** (which has none): η, the weight-decay term and an optional
  preconditioner factor are parameters; it is only meaningful near a (quasi-)fixed point.

These functions run autograd and synchronise freely: they are for low-cadence probes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

LossFn = Callable[[], Tensor]


def _params(params: Sequence[Tensor]) -> list[Tensor]:
    ps = list(params)
    if not ps:
        raise ValueError("expected at least one parameter tensor, got none")
    for i, p in enumerate(ps):
        if not p.requires_grad:
            raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) does not require grad")
    return ps


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def _norm(a: Sequence[Tensor]) -> Tensor:
    return torch.sqrt(sum((x * x).sum() for x in a))  # type: ignore[arg-type]


def _check_vector(params: Sequence[Tensor], v: Sequence[Tensor]) -> None:
    if len(v) != len(params):
        raise ValueError(f"expected a vector with one tensor per parameter ({len(params)}), "
                         f"got {len(v)}")
    for i, (p, x) in enumerate(zip(params, v)):
        if x.shape != p.shape:
            raise ValueError(f"vector part {i}: expected shape {tuple(p.shape)}, got {tuple(x.shape)}")


def hvp_operator(loss_fn: LossFn, params: Sequence[Tensor]) -> Callable[[Sequence[Tensor]], list[Tensor]]:
    """Evaluate ``loss_fn()`` and its gradient graph once; return ``v ↦ H v`` (list per param).

    Every call of the returned operator is one extra backward pass through the gradient graph.
    """
    ps = _params(params)
    loss = loss_fn()
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)}")
    grads = torch.autograd.grad(loss, ps, create_graph=True)

    def apply(v: Sequence[Tensor]) -> list[Tensor]:
        _check_vector(ps, v)
        dot = _dot(grads, [x.detach() for x in v])
        hv = torch.autograd.grad(dot, ps, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, ps)]

    return apply


def hvp(loss_fn: LossFn, params: Sequence[Tensor], v: Sequence[Tensor]) -> list[Tensor]:
    """Hessian-vector product ``H v = ∇_θ⟨∇_θ L(θ), v⟩`` of ``loss_fn()`` at ``params``."""
    return hvp_operator(loss_fn, params)(v)


def top_hessian_eigenvalue(loss_fn: LossFn, params: Sequence[Tensor], iters: int = 20,
                           tol: float = 1e-4, generator: torch.Generator | None = None,
                           init: Sequence[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
    """Dominant Hessian eigenpair by power iteration on HVPs: ``(λ, v)`` with ``‖v‖ = 1``.

    ``v ← Hv/‖Hv‖``, ``λ = vᵀHv`` (Rayleigh quotient), at most ``iters`` HVPs, stopping early
    when ``|λ_k − λ_{k−1}| ≤ tol·|λ_k|``. Power iteration finds the eigenvalue of largest
    *magnitude* (near a minimum the Hessian is ~PSD and that is the top one). The start vector
    is ``init`` or Gaussian from ``generator`` (the global RNG is never touched). One forward and
    backward with ``create_graph`` plus one backward per iteration.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    ps = _params(params)
    op = hvp_operator(loss_fn, ps)
    if init is not None:
        _check_vector(ps, init)
        v = [x.detach().to(p.dtype) for x, p in zip(init, ps)]
    else:
        gen_dev = generator.device if generator is not None else torch.device("cpu")
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        v = [torch.randn(p.shape, generator=gen, device=gen_dev, dtype=p.dtype).to(p.device)
             for p in ps]
    norm = _norm(v)
    if not float(norm) > 0:
        raise ValueError("the initial vector must be non-zero")
    v = [x / norm for x in v]
    lam = torch.zeros((), dtype=ps[0].dtype, device=ps[0].device)
    for k in range(iters):
        hv = op(v)
        new = _dot(v, hv)                                               # Rayleigh quotient
        hv_norm = _norm(hv)
        if not float(hv_norm) > 0:                                      # v in the null space
            return new.detach(), v
        v = [x / hv_norm for x in hv]
        converged = k > 0 and float((new - lam).abs()) <= tol * float(new.abs())
        lam = new.detach()
        if converged:
            break
    return lam, v


def lyapunov_exponent(curvatures: Tensor, lr: float | Tensor, weight_decay: float = 0.0,
                      preconditioner: float | Tensor = 1.0) -> Tensor:
    """``Λ = mean_t log|1 − η p ĥ_t − η λ_wd|`` of sampled curvatures ``ĥ_t`` (0-d float64).

    Ziyin et al. (arXiv 2303.13093): SGD is stable in probability along the direction iff
    ``Λ < 0``. The scalar sampled form is docs/metrics.md §10 design 1 **[D, unverified against the
    paper]**; ``lr`` may be a tensor of per-sample learning rates, ``preconditioner`` p is the
    optimiser's effective scaling along the direction (1 for SGD). ``|·| = 0`` gives ``−inf``.
    Check values (docs/metrics.md §10): ĥ = 0.5 w.p. 0.7, 4.0 w.p. 0.3, η = 1 → Λ = −0.156;
    with w.p. 0.55 / 0.45 → +0.113.
    """
    h = torch.as_tensor(curvatures).to(torch.float64).reshape(-1)
    if h.numel() == 0:
        return torch.full((), math.nan, dtype=torch.float64, device=h.device)
    eta = torch.as_tensor(lr, dtype=torch.float64, device=h.device)
    p = torch.as_tensor(preconditioner, dtype=torch.float64, device=h.device)
    return torch.log((1.0 - eta * p * h - eta * weight_decay).abs()).mean()

"""Optional low-cadence curvature probe: sharpness and the SGD Lyapunov exponent (off by default).

Implements docs/metrics.md §10 design 1 ("scalar, sampled") — a design of that note, **not code from
the paper** — for Ziyin, Li, Galanti & Ueda (arXiv 2303.13093, "Probabilistic stability of
stochastic gradient descent"), and the sharpness of Lyle et al. (ICML 2023, docs/metrics.md §7a):

* every ``refresh_every`` steps the top Hessian eigenvector v is refreshed by ``power_iters``
  HVP power iterations on the loss the caller passes (ideally a large batch);
* at every sampled step (``step % every == 0``) one HVP on the *current minibatch* loss gives
  ``ĥ_t = vᵀ Ĥ_{B_t} v`` and ``log|1 − η ĥ_t − η λ_wd|`` is accumulated.

Signals (host floats): ``hessian_top_eigenvalue`` (last refresh), ``sgd_lyapunov_exponent``
(``Λ̂`` = mean of the accumulated logs; < 0 means stable in probability along v),
``curvature_samples`` (how many ĥ_t entered Λ̂). Samples taken under different learning rates
are pooled: call :meth:`CurvatureProbe.reset` at a schedule change to report Λ per LR phase.

Cost and syncs: one HVP (≈ 2 backward passes) per sampled step plus ``power_iters`` HVPs per
refresh. The probe **synchronises the device** (it returns Python floats and power iteration
checks convergence on the host); that is why it runs only at the user's chosen low cadence.
Meaningful only near a (quasi-)fixed point; BatchNorm/dropout make the HVP stochastic; for
Adam pass the effective preconditioner along v as ``preconditioner``. The probe never writes
``.grad`` and draws its start vector from its own generator, but ``loss_fn`` runs exactly as
written: a forward pass in train mode updates BatchNorm running statistics and dropout consumes
the global RNG. For a run that must stay bit-identical with and without the probe, pass a
``loss_fn`` that evaluates in eval mode (or on copies of the buffers, e.g. with
``torch.func.functional_call``) and without dropout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from monitor.functional.curvature import hvp, top_hessian_eigenvalue


class CurvatureProbe:
    """Sampled top-eigenvalue and Lyapunov-exponent probe over ``model_params``."""

    signals: tuple[str, ...] = ("hessian_top_eigenvalue", "sgd_lyapunov_exponent",
                                "curvature_samples")

    def __init__(self, model_params: Iterable[Tensor], every: int, power_iters: int = 20,
                 refresh_every: int | None = None, tol: float = 1e-4, seed: int = 0) -> None:
        self.params = [p for p in model_params if p.requires_grad]
        if not self.params:
            raise ValueError("expected at least one parameter that requires grad, got none")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        refresh_every = every * 10 if refresh_every is None else refresh_every
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        if power_iters < 1:
            raise ValueError(f"power_iters must be >= 1, got {power_iters}")
        self.every = every
        self.refresh_every = refresh_every
        self.power_iters = power_iters
        self.tol = tol
        dev = self.params[0].device
        self.generator = torch.Generator(device=dev)   # own RNG: never the global one
        self.generator.manual_seed(seed)
        self.reset()

    def reset(self) -> None:
        """Forget the direction and the accumulated samples."""
        self.direction: list[Tensor] | None = None
        self.top_eigenvalue = math.nan
        self._last_refresh: int | None = None
        self._log_sum = 0.0
        self._samples = 0

    def _due_refresh(self, step: int) -> bool:
        return (self.direction is None or self._last_refresh is None
                or step - self._last_refresh >= self.refresh_every)

    def refresh(self, loss_fn: Callable[[], Tensor], step: int = 0) -> float:
        """Recompute the top eigenpair by power iteration on ``loss_fn`` (warm-started)."""
        lam, v = top_hessian_eigenvalue(loss_fn, self.params, iters=self.power_iters,
                                        tol=self.tol, generator=self.generator,
                                        init=self.direction)
        self.direction = [x.detach() for x in v]
        self.top_eigenvalue = float(lam)   # host sync: low cadence by design
        self._last_refresh = step
        return self.top_eigenvalue

    def maybe_probe(self, step: int, loss_fn: Callable[[], Tensor], lr: float,
                    weight_decay: float = 0.0, preconditioner: float = 1.0,
                    refresh_loss_fn: Callable[[], Tensor] | None = None
                    ) -> dict[str, float] | None:
        """At sampled steps, one HVP on ``loss_fn`` (the current minibatch loss); else None.

        ``loss_fn`` must rebuild the loss from the current parameters (a closure over the
        batch). ``refresh_loss_fn`` (default ``loss_fn``) is used when the direction is due for
        a refresh. The gradients it computes are not written to ``.grad``.
        """
        if step % self.every != 0:
            return None
        if self._due_refresh(step):
            self.refresh(refresh_loss_fn or loss_fn, step)
        assert self.direction is not None
        hv = hvp(loss_fn, self.params, self.direction)
        h_t = float(sum((x * y).sum() for x, y in zip(self.direction, hv)))  # host sync
        factor = abs(1.0 - lr * preconditioner * h_t - lr * weight_decay)
        self._log_sum += math.log(factor) if factor > 0 else -math.inf
        self._samples += 1
        return self.compute()

    def compute(self) -> dict[str, float]:
        """The current signals as host floats (Λ̂ is NaN before the first sample)."""
        lyap = self._log_sum / self._samples if self._samples else math.nan
        return {"hessian_top_eigenvalue": self.top_eigenvalue,
                "sgd_lyapunov_exponent": lyap,
                "curvature_samples": float(self._samples)}

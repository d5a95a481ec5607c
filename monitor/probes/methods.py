"""The Monitor's model-level methods: GAN pairs, per-sample Q-Scores, weights and curvature.

A mixin of :class:`monitor.Monitor` (which owns the state they use: the engine, its lock, the
error log, the overhead budget and the step), kept in a module of its own so that the facade
holds capture, publish, state and lifecycle only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from monitor.validation import check_int

if TYPE_CHECKING:
    import threading

    from monitor.config import MonitorConfig
    from monitor.engine import Engine
    from monitor.engine.overhead import OverheadBudget
    from monitor.engine.side_streams import SideStreams
    from monitor.errors import ErrorLog


class ModelProbes:
    """Model-level signals of a :class:`monitor.Monitor` (see the module docstring)."""

    config: MonitorConfig
    _engine: Engine
    _lock: threading.RLock
    _side: SideStreams
    _errors: ErrorLog
    _overhead: OverheadBudget
    _step: int

    def pair(self, fake: str, real: str, *, reservoir: int = 512,
             dup_quantile: float = 0.01) -> None:
        """Compare generated stream ``fake`` with real stream ``real`` (GAN mode collapse):
        diversity ratio, birthday-paradox duplicate rate and effective-rank ratio."""
        with self._lock:
            self._engine.pair(fake, real, reservoir=reservoir, dup_quantile=dup_quantile,
                              seed=self.config.seed)

    def sample_scores(self, stream: str) -> tuple[Tensor, Tensor]:
        """Q-Scores of the last batch of ``stream`` and the rows' indices in that batch (for
        data triage: low scores are the samples the representation serves worst). Host sync."""
        self._side.join()
        with self._lock:
            return self._engine.sample_scores(stream)

    def watch_weights(self, model: nn.Module, *, rank_every: int = 10, update_ratio: bool = True,
                      earlybird: Sequence[float] | None = (0.5, 0.8, 0.9)) -> None:
        """Per parameter at publish: norms, gradient norm, update-to-weight ratio; every
        ``rank_every`` publishes rank and stable rank (Galanti et al.) and the early-bird mask
        distance at the ``earlybird`` sparsities (You et al. 2020). See
        :class:`monitor.probes.weights.WeightWatch`."""
        from monitor.probes.weights import WeightWatch

        if not isinstance(model, nn.Module):
            raise TypeError(f"watch_weights() needs a torch.nn.Module, got {type(model).__name__}")
        self._weights = WeightWatch(model, rank_every=check_int("rank_every", rank_every, 1),
                                    update_ratio=update_ratio, earlybird=earlybird)
        self._engine.param_sources.append(self._weights.param_signals)
        self._engine.run_sources.append(self._weights.run_signals)

    def watch_curvature(self, params: Any, *, every: int = 100, power_iters: int = 20,
                        refresh_every: int | None = None) -> None:
        """Turn on the curvature probe (docs/metrics.md §7a, §10): every ``every`` steps
        :meth:`probe_curvature` publishes ``hessian_top_eigenvalue`` and the sampled
        ``sgd_lyapunov_exponent`` (:class:`monitor.probes.curvature.CurvatureProbe`; syncs the
        device at its cadence)."""
        from monitor.probes.curvature import CurvatureProbe

        self._curvature = CurvatureProbe(params, every=check_int("every", every, 1),
                                         power_iters=check_int("power_iters", power_iters, 1),
                                         refresh_every=refresh_every, seed=self.config.seed)
        self._engine.run_sources.append(self._curvature.compute)

    def probe_curvature(self, loss_fn: Callable[[], Tensor], lr: float,
                        weight_decay: float = 0.0) -> None:
        """Call once per step, before ``step()``, with a closure that recomputes this
        minibatch's loss (evaluate it in eval mode to leave BatchNorm statistics and the global
        RNG untouched). Does nothing between sampled steps or without :meth:`watch_curvature`."""
        probe = getattr(self, "_curvature", None)
        if probe is None:
            return
        t0 = time.perf_counter()
        try:
            with self._errors.guard("curvature"):
                probe.maybe_probe(self._step + 1, loss_fn, lr, weight_decay)
        finally:
            self._overhead.add(time.perf_counter() - t0)


__all__ = ["ModelProbes"]

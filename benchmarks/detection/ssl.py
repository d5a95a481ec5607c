"""Self-supervised trainings from lightly's losses, heads and momentum utilities, on digits.

Every setting is a real training of a small CNN on scikit-learn's digits (8×8 grey images,
augmented views) with the loss, projection/prediction heads and EMA utilities of
`lightly <https://github.com/lightly-ai/lightly>`_ (pinned in the ``detection`` extra; nothing
of theirs is copied here). repwatch watches the backbone and the projector as the README says
(``mon.watch(module, name=...)``, ``mon.step()``), with its defaults. Ground truth comes from the
training, not from repwatch: a logistic-regression probe and a k-NN classifier on frozen backbone
features of held-out images every ``probe_every`` steps (and k-NN on the projector's output).

Labels are the papers' claims about each setting:

========================  ===========  =============================================================
setting                   label        claim
========================  ===========  =============================================================
simsiam                   healthy      Chen & He 2021
simsiam_no_stopgrad       complete     Chen & He 2021 §4.1: without stop-gradient the output collapses
simsiam_no_predictor      complete     Chen & He 2021 Table 1: without predictor, collapse
simsiam_stopgrad_off      complete     stop-gradient removed at mid-run: collapse from then on
simsiam_lr_high           complete     lr ×100: training diverges or collapses
byol                      healthy      Grill et al. 2020
byol_no_predictor         complete     Grill et al. 2020 Table 5b: no predictor, collapse
byol_no_ema               complete     Grill et al. 2020 Table 5a: τ = 0 (target = online) fails
simclr                    healthy      Chen et al. 2020
simclr_linear_projector   dimensional  Jing et al. 2022: the embedding collapses dimensionally
barlow                    healthy      Zbontar et al. 2021
barlow_lambda0            dimensional  Zbontar et al. 2021: λ = 0, no redundancy reduction
vicreg                    healthy      Bardes et al. 2022
vicreg_invariance_only    complete     Bardes et al. 2022: invariance alone, every output → a point
vicreg_no_variance        complete     Bardes et al. 2022 Table 7: no variance term, collapse
vicreg_no_covariance      dimensional  Bardes et al. 2022 Table 7: no covariance, dimensional
========================  ===========  =============================================================
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.detection.trace import Label, Trace

__all__ = ["SETTINGS", "Setting", "run_ssl"]


@dataclass(frozen=True)
class Setting:
    """One SSL configuration: method, its ablation, label and the paper behind the label."""

    name: str
    method: str                       # simsiam | byol | simclr | barlow | vicreg
    label: Label
    paper: str
    options: tuple[tuple[str, Any], ...] = ()

    def opt(self, key: str, default: Any) -> Any:
        """Option ``key`` of this setting."""
        return dict(self.options).get(key, default)


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("simsiam", "simsiam", "healthy", "Chen & He, CVPR 2021"),
    Setting("simsiam_no_stopgrad", "simsiam", "complete", "Chen & He, CVPR 2021, §4.1",
            (("stopgrad", False),)),
    Setting("simsiam_no_predictor", "simsiam", "complete", "Chen & He, CVPR 2021, Table 1",
            (("predictor", False),)),
    Setting("simsiam_stopgrad_off", "simsiam", "complete",
            "Chen & He, CVPR 2021, §4.1 (switched at mid-run)", (("stopgrad_until", 0.5),)),
    Setting("simsiam_lr_high", "simsiam", "complete", "a learning rate ×100 (diverges)",
            (("lr_scale", 100.0),)),
    Setting("byol", "byol", "healthy", "Grill et al., NeurIPS 2020"),
    Setting("byol_no_predictor", "byol", "complete", "Grill et al., NeurIPS 2020, Table 5b",
            (("predictor", False),)),
    Setting("byol_no_ema", "byol", "complete", "Grill et al., NeurIPS 2020, Table 5a (tau = 0)",
            (("momentum", 0.0),)),
    Setting("simclr", "simclr", "healthy", "Chen et al., ICML 2020"),
    Setting("simclr_linear_projector", "simclr", "dimensional", "Jing et al., ICLR 2022",
            (("linear_projector", True),)),
    Setting("barlow", "barlow", "healthy", "Zbontar et al., ICML 2021"),
    Setting("barlow_lambda0", "barlow", "dimensional", "Zbontar et al., ICML 2021 (lambda = 0)",
            (("lambda", 0.0),)),
    Setting("vicreg", "vicreg", "healthy", "Bardes et al., ICLR 2022"),
    Setting("vicreg_invariance_only", "vicreg", "complete", "Bardes et al., ICLR 2022",
            (("mu", 0.0), ("nu", 0.0))),
    Setting("vicreg_no_variance", "vicreg", "complete", "Bardes et al., ICLR 2022, Table 7",
            (("mu", 0.0),)),
    Setting("vicreg_no_covariance", "vicreg", "dimensional", "Bardes et al., ICLR 2022, Table 7",
            (("nu", 0.0),)),
)}

FEATURE_DIM = 64


class Backbone(nn.Module):
    """A small CNN for 8×8 digits: two conv blocks, global average pool → 64 features."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, FEATURE_DIM, 3, padding=1), nn.BatchNorm2d(FEATURE_DIM), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def load_digits_split(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits as (n, 1, 8, 8) floats in [0, 1]; a seeded 70/30 split (train, test)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(1000 + seed)
    perm = torch.randperm(x.shape[0], generator=g)
    cut = int(0.7 * x.shape[0])
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def augment(x: Tensor, g: torch.Generator) -> Tensor:
    """A random view: affine crop-and-rescale (scale 0.7–1.1, shift ±1.5 px, rotation ±15°),
    brightness jitter, Gaussian noise and a random 3×3 cut-out."""
    b = x.shape[0]
    scale = 0.7 + 0.4 * torch.rand(b, generator=g)
    angle = (torch.rand(b, generator=g) - 0.5) * (math.pi / 6)
    shift = (torch.rand(b, 2, generator=g) - 0.5) * (3.0 / 4.0)   # in [-1, 1] grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    v = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    v = v * (0.6 + 0.8 * torch.rand(b, 1, 1, 1, generator=g))
    v = v + 0.1 * torch.randn(v.shape, generator=g)
    cy = torch.randint(0, 6, (b,), generator=g)
    cx = torch.randint(0, 6, (b,), generator=g)
    rows = torch.arange(8)
    mask = (((rows[None, :, None] - cy[:, None, None]).abs() <= 1)
            & ((rows[None, None, :] - cx[:, None, None]).abs() <= 1))
    keep = torch.rand(b, generator=g) < 0.5
    v = torch.where((mask & keep[:, None, None])[:, None], torch.zeros_like(v), v)
    return v


@torch.no_grad()
def features(backbone: nn.Module, x: Tensor) -> np.ndarray:
    """Frozen backbone features (eval mode) as float64 numpy."""
    was = backbone.training
    backbone.eval()
    out = backbone(x).double().numpy()
    backbone.train(was)
    return out


def probe(backbone: nn.Module, xtr: Tensor, ytr: Tensor, xte: Tensor, yte: Tensor,
          head: nn.Module | None = None) -> dict[str, float]:
    """Held-out accuracies on frozen features: a linear probe (standardised logistic
    regression) and 5-NN (cosine) on the backbone; 5-NN on the projector too when ``head``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    def knn(ftr: np.ndarray, fte: np.ndarray) -> float:
        model = KNeighborsClassifier(5, metric="cosine").fit(ftr + 1e-12, ytr.numpy())
        return float(model.score(fte + 1e-12, yte.numpy()))

    ftr, fte = features(backbone, xtr), features(backbone, xte)
    if not (np.isfinite(ftr).all() and np.isfinite(fte).all()):
        return {"linear_probe": 0.1, "knn": 0.1, "projector_knn": 0.1, "finite": 0.0,
                "backbone_rankme": 1.0, "projector_rankme": 1.0}
    scaler = StandardScaler().fit(ftr)
    clf = LogisticRegression(max_iter=200, tol=1e-3).fit(scaler.transform(ftr), ytr.numpy())
    out = {"linear_probe": float(clf.score(scaler.transform(fte), yte.numpy())),
           "knn": knn(ftr, fte), "finite": 1.0, "backbone_rankme": rankme_np(fte)}
    if head is not None:
        full = nn.Sequential(backbone, head)
        ptr, pte = features(full, xtr), features(full, xte)
        ok = bool(np.isfinite(ptr).all() and np.isfinite(pte).all())
        out["projector_knn"] = knn(ptr, pte) if ok else 0.1
        out["projector_rankme"] = rankme_np(pte) if ok else 1.0
    return out


def rankme_np(z: np.ndarray, eps: float = 1e-7) -> float:
    """RankMe of held-out rows (Garrido et al. 2023, uncentred singular values), in numpy: the
    benchmark's own measure, independent of repwatch's streaming code."""
    sigma = np.linalg.svd(z, compute_uv=False)
    if not sigma.sum() > 0:
        return 1.0
    p = sigma / sigma.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


class Method(nn.Module):
    """Backbone + lightly heads + lightly loss for one setting; ``loss(x1, x2, step)``."""

    def __init__(self, setting: Setting, steps: int) -> None:
        super().__init__()
        from lightly.loss import (
            BarlowTwinsLoss,
            NegativeCosineSimilarity,
            NTXentLoss,
            VICRegLoss,
        )
        from lightly.models.modules import heads

        self.setting, self.steps = setting, steps
        m = setting.method
        self.backbone = Backbone()
        self.predictor: nn.Module | None = None
        self.target: nn.Module | None = None
        if m == "simsiam":
            self.projector: nn.Module = heads.SimSiamProjectionHead(FEATURE_DIM, 128, 64)
            if setting.opt("predictor", True):
                self.predictor = heads.SimSiamPredictionHead(64, 32, 64)
            self.criterion: nn.Module = NegativeCosineSimilarity()
        elif m == "byol":
            self.projector = heads.BYOLProjectionHead(FEATURE_DIM, 128, 64)
            if setting.opt("predictor", True):
                self.predictor = heads.BYOLPredictionHead(64, 128, 64)
            self.criterion = NegativeCosineSimilarity()
        elif m == "simclr":
            if setting.opt("linear_projector", False):
                self.projector = heads.SimCLRProjectionHead(FEATURE_DIM, FEATURE_DIM, 64,
                                                            num_layers=1, batch_norm=False)
            else:
                self.projector = heads.SimCLRProjectionHead(FEATURE_DIM, 128, 64)
            self.criterion = NTXentLoss(temperature=0.2)
        elif m == "barlow":
            self.projector = heads.BarlowTwinsProjectionHead(FEATURE_DIM, 256, 512)
            self.criterion = BarlowTwinsLoss(lambda_param=setting.opt("lambda", 5e-3))
        elif m == "vicreg":
            from lightly.models.modules.heads import VICRegProjectionHead

            self.projector = VICRegProjectionHead(FEATURE_DIM, 256, 128, num_layers=2)
            self.criterion = VICRegLoss(lambda_param=25.0, mu_param=setting.opt("mu", 25.0),
                                        nu_param=setting.opt("nu", 1.0))
        else:
            raise ValueError(f"unknown method {m!r}")
        if m == "byol":
            from lightly.models.utils import deactivate_requires_grad

            self.target = nn.Sequential(copy.deepcopy(self.backbone),
                                        copy.deepcopy(self.projector))
            deactivate_requires_grad(self.target)

    def loss(self, x1: Tensor, x2: Tensor, step: int) -> Tensor:
        """The setting's loss on two views at ``step``."""
        s, m = self.setting, self.setting.method
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        if m == "simsiam":
            p1 = self.predictor(z1) if self.predictor is not None else z1
            p2 = self.predictor(z2) if self.predictor is not None else z2
            stop = s.opt("stopgrad", True)
            until = s.opt("stopgrad_until", None)
            if until is not None:
                stop = step < until * self.steps
            t1, t2 = (z1.detach(), z2.detach()) if stop else (z1, z2)
            return 0.5 * (self.criterion(p1, t2) + self.criterion(p2, t1))
        if m == "byol":
            from lightly.models.utils import update_momentum
            from lightly.utils.scheduler import cosine_schedule

            assert self.target is not None
            tau = s.opt("momentum", None)
            if tau is None:
                tau = cosine_schedule(step, self.steps, 0.99, 1.0)
            update_momentum(nn.Sequential(self.backbone, self.projector), self.target, m=tau)
            p1 = self.predictor(z1) if self.predictor is not None else z1
            p2 = self.predictor(z2) if self.predictor is not None else z2
            with torch.no_grad():
                t1, t2 = self.target(x1), self.target(x2)
            return 0.5 * (self.criterion(p1, t2) + self.criterion(p2, t1))
        return self.criterion(z1, z2)


def probe_drop_step(truth: list[dict[str, float]], margin: float = 0.05,
                    keys: tuple[str, ...] = ("linear_probe", "knn")) -> int | None:
    """First step at which the backbone's linear-probe or k-NN accuracy is ``margin`` below the
    best it reached before (the random initialisation's included): the training's own evidence
    that the representation lost information."""
    best = {k: -math.inf for k in keys}
    for row in truth:
        if any(row[k] < best[k] - margin for k in keys):
            return int(row["step"])
        best = {k: max(best[k], row[k]) for k in keys}
    return None


def contradiction(label: str, truth: list[dict[str, float]]) -> str | None:
    """Why the training's own evidence contradicts the paper's label (None: it agrees).

    * labelled a collapse, yet at the end the backbone's probe and k-NN are within 0.02 of (or
      above) their random-init values and the held-out RankMe of backbone and projector is at
      least half of the highest it reached during training: the training shows no collapse;
    * labelled healthy, yet the backbone's probe ends 0.02 or its k-NN 0.05 below the random
      initialisation's: the training degraded the representation.
    """
    first, last = truth[0], truth[-1]
    if label != "healthy":
        top = {k: max(r[k] for r in truth[1:]) for k in ("backbone_rankme", "projector_rankme")}
        kept = (last["linear_probe"] >= first["linear_probe"] - 0.02
                and last["knn"] >= first["knn"] - 0.02
                and last["backbone_rankme"] >= 0.5 * top["backbone_rankme"]
                and last["projector_rankme"] >= 0.5 * top["projector_rankme"])
        if kept:
            return (f"no collapse: probe {first['linear_probe']:.3f} → {last['linear_probe']:.3f}, "
                    f"k-NN {first['knn']:.3f} → {last['knn']:.3f}, held-out projector RankMe "
                    f"{last['projector_rankme']:.1f} (highest {top['projector_rankme']:.1f})")
        return None
    if (last["linear_probe"] < first["linear_probe"] - 0.02
            or last["knn"] < first["knn"] - 0.05):
        return (f"degraded below the random init: probe {first['linear_probe']:.3f} → "
                f"{last['linear_probe']:.3f}, k-NN {first['knn']:.3f} → {last['knn']:.3f}")
    return None


def run_ssl(setting: Setting | str, seed: int = 0, steps: int = 400, batch: int = 128,
            probe_every: int = 25, window: int | None = None,
            log: Callable[[str], None] | None = None) -> Trace:
    """Train ``setting`` for ``steps`` steps with repwatch attached (its defaults, or another
    scoring ``window``); return its trace."""
    from monitor import Monitor

    s = SETTINGS[setting] if isinstance(setting, str) else setting
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits_split(seed)
    model = Method(s, steps)
    lr = {"simsiam": 0.05, "byol": 0.05, "simclr": 0.1, "barlow": 0.05,
          "vicreg": 0.05}[s.method] * s.opt("lr_scale", 1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    mon = Monitor(run=f"{s.name}-{seed}", port=None, seed=seed,
                  **({} if window is None else {"window": window}))
    mon.watch(model.backbone, name="backbone")
    mon.watch(model.projector, name="projector")
    g = torch.Generator().manual_seed(seed)
    trace = Trace("ssl", s.name, seed, s.label, s.paper, mon.window, mon.peak_warmup, steps)
    t0 = time.perf_counter()
    trace.truth.append({"step": 0.0, **probe(model.backbone, xtr, ytr, xte, yte, model.projector)})
    for step in range(1, steps + 1):
        idx = torch.randint(0, xtr.shape[0], (batch,), generator=g)
        x = xtr[idx]
        loss = model.loss(augment(x, g), augment(x, g), step)
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1e6)
            opt.step()
        trace.record(mon.step())
        if step % probe_every == 0:
            row = {"step": float(step), "loss": float(loss.detach()),
                   **probe(model.backbone, xtr, ytr, xte, yte, model.projector)}
            trace.truth.append(row)
            if log is not None:
                log(f"{s.name}/{seed} step {step}: loss {row['loss']:.3f} probe "
                    f"{row['linear_probe']:.3f} knn {row['knn']:.3f}")
    mon.close()
    trace.wall_seconds = time.perf_counter() - t0
    init = trace.truth[0]["linear_probe"]
    final = trace.truth[-1]
    trace.outcome = {"probe_init": init, "probe_final": final["linear_probe"],
                     "knn_init": trace.truth[0]["knn"], "knn_final": final["knn"],
                     "projector_knn_init": trace.truth[0]["projector_knn"],
                     "projector_knn_final": final["projector_knn"],
                     "backbone_rankme_init": trace.truth[0]["backbone_rankme"],
                     "backbone_rankme_final": final["backbone_rankme"],
                     "projector_rankme_init": trace.truth[0]["projector_rankme"],
                     "projector_rankme_final": final["projector_rankme"], "probe_best": max(r["linear_probe"] for r in trace.truth),
                     "probe_drop_step": probe_drop_step(trace.truth),
                     "finite": bool(final.get("finite", 1.0))}
    trace.outcome["contradiction"] = contradiction(s.label, trace.truth)
    return trace

"""A tiny SimSiam setup on scikit-learn's 8x8 digits, for demos and tests.

SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning",
CVPR 2021) learns representations from two augmented views of each image
without negative pairs. What keeps it from collapsing to a constant output is
the stop-gradient on the target branch; with ``stop_gradient=False`` the loss
back-propagates through both branches and, as in the paper's ablation, the
embeddings collapse to a constant vector within about a hundred steps.

Everything runs on CPU in a few seconds::

    setup = build(seed=0)
    for step in range(600):
        loss = train_step(setup, stop_gradient=step < 300)  # collapse at 300

Randomness for data sampling and augmentation comes only from
``setup.generator``, so a run is reproducible from its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

__all__ = [
    "load_digits_tensor",
    "augment",
    "SimSiam",
    "DemoSetup",
    "build",
    "train_step",
]


def load_digits_tensor(device: torch.device | str = "cpu") -> torch.Tensor:
    """Return the 1797 digits images as a (1797, 64) float32 tensor.

    Pixels are standardised with one global mean and std (not per pixel), so
    the 8x8 layout still makes sense for shifts and the background stays a
    single value (each image's minimum).
    """
    x = torch.as_tensor(load_digits().data, dtype=torch.float32)
    x = (x - x.mean()) / x.std()
    return x.to(device)


def augment(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    max_shift: int = 1,
    drop_prob: float = 0.2,
    noise_std: float = 0.2,
) -> torch.Tensor:
    """Return a random view of a batch of flattened 8x8 images.

    A shift of up to `max_shift` pixels along each axis, pixel dropout
    (pixels set to background) and Gaussian noise. All randomness comes from
    `generator`, never from the global RNG.
    """
    n, dev = x.shape[0], x.device
    img = x.view(n, 8, 8)
    background = img.amin(dim=(1, 2), keepdim=True)  # value of a blank pixel

    # Shift: pad with background, then crop an 8x8 window at a random offset.
    k = max_shift
    padded = background.expand(n, 8 + 2 * k, 8 + 2 * k).clone()
    padded[:, k : 8 + k, k : 8 + k] = img
    dy = torch.randint(0, 2 * k + 1, (n, 1, 1), generator=generator, device=dev)
    dx = torch.randint(0, 2 * k + 1, (n, 1, 1), generator=generator, device=dev)
    grid = torch.arange(8, device=dev)
    rows = dy + grid.view(1, 8, 1)
    cols = dx + grid.view(1, 1, 8)
    img = padded[torch.arange(n, device=dev).view(n, 1, 1), rows, cols]

    # Pixel dropout.
    drop = torch.rand(n, 8, 8, generator=generator, device=dev) < drop_prob
    img = torch.where(drop, background, img)

    # Additive Gaussian noise.
    noise = torch.randn(n, 8, 8, generator=generator, device=dev)
    img = img + noise_std * noise
    return img.reshape(n, 64)


def _negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z): mean negative cosine similarity."""
    return -F.cosine_similarity(p, z, dim=-1).mean()


class SimSiam(nn.Module):
    """SimSiam with small MLPs: backbone -> projector (z) -> predictor (p)."""

    def __init__(
        self,
        in_dim: int = 64,
        hidden_dim: int = 256,
        rep_dim: int = 128,
        proj_dim: int = 64,
        pred_dim: int = 32,
    ) -> None:
        super().__init__()
        # Encoder: its output is the representation the monitor hooks.
        self.backbone = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, rep_dim, bias=False),
            nn.BatchNorm1d(rep_dim),
            nn.ReLU(),
        )
        # Projection MLP with BN on the hidden layer. There is no BN on the
        # output (the paper's "BN on hidden layers only" variant): an output
        # BN forces every dimension to keep unit variance across the batch,
        # which hides the collapse of the no-stop-gradient ablation.
        self.projector = nn.Sequential(
            nn.Linear(rep_dim, rep_dim, bias=False),
            nn.BatchNorm1d(rep_dim),
            nn.ReLU(),
            nn.Linear(rep_dim, proj_dim),
        )
        # Prediction MLP with a bottleneck.
        self.predictor = nn.Sequential(
            nn.Linear(proj_dim, pred_dim, bias=False),
            nn.BatchNorm1d(pred_dim),
            nn.ReLU(),
            nn.Linear(pred_dim, proj_dim),
        )

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, stop_gradient: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (loss, z1, z2) for two views of the same batch.

        loss = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2, where sg is a
        stop-gradient (detach) only if `stop_gradient` is True.
        """
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        p1 = self.predictor(z1)
        p2 = self.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if stop_gradient else (z1, z2)
        loss = _negative_cosine(p1, t2) / 2 + _negative_cosine(p2, t1) / 2
        return loss, z1, z2


@dataclass
class DemoSetup:
    """Everything a training loop needs."""

    model: SimSiam
    optimizer: torch.optim.Optimizer
    data: torch.Tensor
    generator: torch.Generator
    batch_size: int


def build(
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    lr: float = 3e-3,
) -> DemoSetup:
    """Create model, optimizer, data and a seeded generator.

    Weights are initialised from `torch.manual_seed(seed)`; batches and
    augmentations are drawn from a dedicated generator seeded with `seed`.
    AdamW with a short second-moment memory (beta2=0.95) lets the run react
    within ~150 steps when stop-gradient is switched off mid-run.
    """
    torch.manual_seed(seed)
    model = SimSiam().to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=1e-4
    )
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    data = load_digits_tensor(device)
    return DemoSetup(model, optimizer, data, generator, batch_size)


def train_step(setup: DemoSetup, stop_gradient: bool = True) -> torch.Tensor:
    """Run one optimizer step on a random batch; return the detached loss."""
    model, data, gen = setup.model, setup.data, setup.generator
    model.train()
    idx = torch.randint(
        0, data.shape[0], (setup.batch_size,), generator=gen, device=data.device
    )
    x = data[idx]
    x1, x2 = augment(x, gen), augment(x, gen)
    loss, _, _ = model(x1, x2, stop_gradient=stop_gradient)
    setup.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    setup.optimizer.step()
    return loss.detach()

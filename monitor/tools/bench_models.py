"""Models and data of ``repwatch bench``'s training-overhead figure (docs/performance.md).

Plain ``torch.nn`` definitions (no torchvision): a small CNN and a small transformer for the CPU,
and ResNet-50- and ViT-B-sized models for a GPU. Each :class:`Workload` holds a seeded model,
one fixed synthetic batch, the module whose output repwatch watches, and a training step
(forward, loss, backward, Adam step). The data is generated, so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Workload:
    """One training set-up: ``step()`` runs one optimizer step on the fixed batch."""

    name: str
    model: nn.Module
    watched: nn.Module
    step: Callable[[], Tensor]
    batch: int
    params: int
    dim: int


class SmallCNN(nn.Module):
    """Three conv blocks (32, 64, 128 channels) on 32×32 RGB, global pooling, a linear head;
    the watched representation is the 128-d pooled feature."""

    def __init__(self, classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class SmallTransformer(nn.Module):
    """A pre-norm transformer encoder language model (token + learned position embeddings,
    ``layers`` blocks, tied-free linear head); the watched representation is the encoder's
    output, mean-pooled over tokens by repwatch."""

    def __init__(self, vocab: int = 1000, d_model: int = 128, heads: int = 4, layers: int = 2,
                 seq: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq, d_model))
        block = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True,
                                           activation="gelu")
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.pos[: tokens.shape[1]]))


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck block (stride on the 3×3 convolution)."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                   nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.skip(x))


class ResNet50(nn.Module):
    """ResNet-50 (He et al. 2016; stages 3-4-6-3, 25.6 M parameters with 1000 classes);
    the watched representation is the 2048-d pooled feature."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                   nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        cin = 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = 4 * width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class ViT(nn.Module):
    """Vision transformer (Dosovitskiy et al. 2021); ViT-B/16 by default (86 M parameters):
    16×16 patches of 224×224 images, 12 pre-norm blocks of width 768, a class token whose
    final state (``tokens="cls"`` in repwatch) feeds the head."""

    def __init__(self, image: int = 224, patch: int = 16, d_model: int = 768, layers: int = 12,
                 heads: int = 12, classes: int = 1000) -> None:
        super().__init__()
        self.patchify = nn.Conv2d(3, d_model, patch, patch)
        tokens = (image // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos = nn.Parameter(torch.zeros(1, tokens, d_model))
        block = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True,
                                           activation="gelu")
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: Tensor) -> Tensor:
        z = self.patchify(x).flatten(2).transpose(1, 2)                   # (b, T, d)
        z = torch.cat([self.cls.expand(z.shape[0], -1, -1), z], dim=1) + self.pos
        z = self.norm(self.encoder(z))
        return self.head(z[:, 0])


@dataclass(frozen=True)
class _Spec:
    make: Callable[[], nn.Module]
    batch: int                     # full size (quick: ``quick_batch``)
    quick_batch: int
    inputs: Callable[[int, torch.Generator], tuple[Tensor, Tensor]]
    watched: Callable[[nn.Module], nn.Module]
    dim: int


def _images(size: int, classes: int) -> Callable[[int, torch.Generator], tuple[Tensor, Tensor]]:
    return lambda b, gen: (torch.randn(b, 3, size, size, generator=gen),
                           torch.randint(0, classes, (b,), generator=gen))


def _tokens(b: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randint(0, 1000, (b, 64), generator=gen)
    return x, torch.randint(0, 1000, (b * 64,), generator=gen)     # next-token-like targets


WORKLOADS: dict[str, _Spec] = {
    "cnn": _Spec(SmallCNN, 128, 32, _images(32, 10), lambda m: m.features, 128),
    "transformer": _Spec(SmallTransformer, 32, 8, _tokens, lambda m: m.encoder, 128),
    "resnet50": _Spec(ResNet50, 64, 8, _images(224, 1000), lambda m: m.features, 2048),
    "vit_b": _Spec(ViT, 64, 8, _images(224, 1000), lambda m: m.norm, 768),
}
"""The figure's workloads: model, batch (full, quick), synthetic inputs, watched module, d."""


def build(name: str, device: torch.device, seed: int = 0, quick: bool = False) -> Workload:
    """The workload ``name`` (a key of :data:`WORKLOADS`) on ``device``; ``quick``: a smaller
    batch (the test's sizes). GPU workloads train under bf16 autocast."""
    spec = WORKLOADS.get(name)
    if spec is None:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)            # parameter initialisation (the bench owns this process)
    b = spec.quick_batch if quick else spec.batch
    x, y = spec.inputs(b, gen)
    model = spec.make().to(device)
    x, y = x.to(device), y.to(device)
    amp = device.type == "cuda"
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.flatten(0, -2) if logits.dim() > 2
                                               else logits, y)
        loss.backward()
        opt.step()
        return loss.detach()

    params = sum(p.numel() for p in model.parameters())
    return Workload(name, model, spec.watched(model), step, b, params, spec.dim)

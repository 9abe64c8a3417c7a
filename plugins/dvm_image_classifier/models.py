"""The networks this plugin trains, in plain PyTorch, each built from a JSON-able spec.

The spec goes into the model card, so `build_model(card["architecture"])` rebuilds the exact
network the weights belong to, with no code from the customer and no pickled objects:

    {"type": "cnn", "in_channels": 1, "num_classes": 10, "image_size": [8, 8],
     "widths": [32, 64]}

- ``cnn``: a small VGG-style net for small images (8×8 to 32×32): per stage two 3×3
  conv–BatchNorm–ReLU layers, a 2×2 max-pool between stages, global average pooling, a linear
  head. One stage more per doubling of the image side (8 px: 2 stages, 32 px: 4).
- ``resnet``: a small ResNet (basic blocks, one per stage, strides 2) for larger images; a
  stride-2 stem above 64 px keeps the cost in check.

No dropout anywhere: dropout would draw from the global RNG during training, which another
job's thread can advance, and the plugin promises bit-identical weights for the same seed.
Global average pooling is a plain ``mean`` rather than ``AdaptiveAvgPool2d``, whose CUDA
backward is not deterministic.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .params import ARCHITECTURES

CNN_MAX_SIDE = 32  # "auto" picks the cnn up to this image side, the resnet above


def choose_architecture(name: str, height: int, width: int) -> str:
    """Resolve ``auto`` to ``cnn`` (images up to 32 px) or ``resnet`` (larger)."""
    if name == "auto":
        return "cnn" if max(height, width) <= CNN_MAX_SIDE else "resnet"
    return name


def make_spec(architecture: str, in_channels: int, num_classes: int, height: int, width: int) -> dict:
    """The spec of the network for this data (architecture ``cnn``, ``resnet`` or ``auto``)."""
    architecture = choose_architecture(architecture, height, width)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}")
    side = min(height, width)
    if architecture == "cnn":
        # 8 px → 2 stages (4×4 after the pool), 16 px → 3, 32 px and more → 4.
        stages = max(1, min(4, int(math.log2(max(side, 2))) - 1))
        widths = [32, 64, 128, 128][:stages]
    else:
        widths = [32, 64, 128, 256]
    spec = {"type": architecture, "in_channels": int(in_channels), "num_classes": int(num_classes),
            "image_size": [int(height), int(width)], "widths": widths}
    if architecture == "resnet":
        spec["stem_stride"] = 2 if side > 64 else 1
    return spec


def build_model(spec: dict) -> nn.Module:
    """Build the (randomly initialised) network a spec describes. Raises ValueError on a bad
    spec. Seed the global RNG first (`torch.manual_seed`) for a reproducible initialisation."""
    kind = spec.get("type")
    try:
        in_channels = int(spec["in_channels"])
        num_classes = int(spec["num_classes"])
        widths = [int(w) for w in spec["widths"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"incomplete model spec: {exc}") from None
    if not widths or in_channels < 1 or num_classes < 2:
        raise ValueError("a model spec needs widths, in_channels ≥ 1 and num_classes ≥ 2")
    if kind == "cnn":
        return SmallCNN(in_channels, num_classes, widths)
    if kind == "resnet":
        return SmallResNet(in_channels, num_classes, widths, stem_stride=int(spec.get("stem_stride", 1)))
    raise ValueError(f"unknown architecture {kind!r} in the model spec")


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Stages of two conv–BN–ReLU layers with max-pooling between them, then global average
    pooling and a linear head. The pooling takes any input size, so the spec's image size is
    only informative here."""

    def __init__(self, in_channels: int, num_classes: int, widths: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, width in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            layers += _conv_bn_relu(cin, width) + _conv_bn_relu(width, width)
            cin = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3×3 convs with a shortcut (a 1×1 conv when shapes change)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A stem conv, one basic block per width (the first at stride 1, then stride 2), average
    pooling and a linear head: a ResNet-10-like net, small enough for a CPU."""

    def __init__(self, in_channels: int, num_classes: int, widths: list[int], stem_stride: int = 1):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, widths[0], stride=stem_stride))
        blocks = []
        cin = widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(cin, width, stride=1 if i == 0 else 2))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))

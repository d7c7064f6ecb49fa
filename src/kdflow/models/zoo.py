"""The architecture registry: name → builder, plus where each family keeps its head and its hint layer.

Every network maps normalised images (N, C, H, W) to logits (N, num_classes). `replace_head` gives a
network a fresh classifier for transfer learning; `hint_layer` names the module whose output feature hints
match. A network is described by a JSON-able *spec* (arch, kwargs, in_channels, num_classes), which together
with a plain state dict (and, after pruning, the changed layer shapes, see `kdflow.models.pruning`) rebuilds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdflow.errors import ModelError

# ------------------------------------------------------------------------------------------------ small CNN


class SmallCNN(nn.Module):
    """Four 3×3 conv-BN-ReLU layers and a linear head; sized for 8×8 to 32×32 inputs.

    `width` sets the first two layers' channels, the last two get 2×width. One max-pool between them halves the
    input (8×8 digits become 4×4, 28×28 MNIST 14×14; inputs need at least 2 px); global average pooling makes
    the head size-independent.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = int(width)
        self.features = nn.Sequential(
            _conv_bn(in_channels, w), _conv_bn(w, w), nn.MaxPool2d(2), _conv_bn(w, 2 * w), _conv_bn(2 * w, 2 * w)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))  # (N, classes)


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


# ------------------------------------------------------------------------------------------- CIFAR ResNets


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016) as used in distillation papers (CRD): depth 6n+2, three stages.

    resnet20/32/56 use widths 16-32-64; the "x4" variants (resnet8x4, resnet32x4) use 32-64-128 → 64-128-256.
    """

    def __init__(self, depth: int, widths: tuple[int, ...], in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ModelError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, C, H/4, W/4)
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------------------------- torchvision


def _torchvision(name: str, in_channels: int, num_classes: int, weights: str | None = None) -> nn.Module:
    """A torchvision classifier; `weights` is a local state-dict path or a torchvision weights name
    (e.g. "IMAGENET1K_V1", downloaded by torchvision where there is a network)."""
    import torchvision

    builder = getattr(torchvision.models, name)
    if weights and not Path(weights).expanduser().is_file():
        model = builder(weights=weights)
    else:
        model = builder(weights=None)
        if weights:
            model.load_state_dict(torch.load(Path(weights).expanduser(), map_location="cpu", weights_only=True))
    if in_channels != 3:
        _adapt_first_conv(model, in_channels)
    replace_head(model, num_classes, arch=name)
    return model


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the stem conv for one with `in_channels` inputs, initialised from the RGB filters' mean scaled by
    3/in_channels, so a grey image gives the same activations as that image repeated on three channels."""
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight.mean(dim=1, keepdim=True).expand_as(new.weight) * (conv.in_channels / in_channels))
    _set_submodule(model, name, new)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


# ------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Arch:
    build: Callable[..., nn.Module]
    head: str  # dotted path of the final nn.Linear
    hint: str  # dotted path of the module whose output feature hints match


MODELS: dict[str, Arch] = {
    "cnn": Arch(SmallCNN, "classifier", "features"),
    "resnet20": Arch(lambda **k: CifarResNet(20, (16, 16, 32, 64), **k), "fc", "layer3"),
    "resnet32": Arch(lambda **k: CifarResNet(32, (16, 16, 32, 64), **k), "fc", "layer3"),
    "resnet56": Arch(lambda **k: CifarResNet(56, (16, 16, 32, 64), **k), "fc", "layer3"),
    "resnet8x4": Arch(lambda **k: CifarResNet(8, (32, 64, 128, 256), **k), "fc", "layer3"),
    "resnet32x4": Arch(lambda **k: CifarResNet(32, (32, 64, 128, 256), **k), "fc", "layer3"),
    "resnet18": Arch(lambda **k: _torchvision("resnet18", **k), "fc", "layer4"),
    "mobilenet_v3_small": Arch(lambda **k: _torchvision("mobilenet_v3_small", **k), "classifier.3", "features"),
}


def build(arch: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Instantiate a registry architecture."""
    if arch not in MODELS:
        raise ModelError(f"unknown architecture {arch!r}; known: {', '.join(sorted(MODELS))}")
    try:
        return MODELS[arch].build(in_channels=in_channels, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise ModelError(f"bad arguments {kwargs} for architecture {arch!r}: {err}") from None


def reinitialize(model: nn.Module) -> nn.Module:
    """Fresh random weights in place, shapes kept: every submodule's own `reset_parameters` (convolutions,
    linear layers, BatchNorm's affine parameters and running statistics)."""
    for m in model.modules():
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
    return model


def replace_head(model: nn.Module, num_classes: int, arch: str) -> nn.Module:
    """A fresh linear classifier with `num_classes` outputs: the transfer-learning step."""
    path = MODELS[arch].head if arch in MODELS else "fc"
    old = model.get_submodule(path)
    _set_submodule(model, path, nn.Linear(old.in_features, num_classes))
    return model


def hint_layer(arch: str) -> str:
    return MODELS[arch].hint


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

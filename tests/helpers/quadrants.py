"""A tiny separable task on the CPU for the training-loop tests: 8×8 one-channel images whose class is the
bright quadrant, the small CNNs trained on it, and `fit` on it with fixed settings."""

from __future__ import annotations

import torch
from torch import nn

from kdflow import models
from kdflow.config import TrainConfig
from kdflow.data import ImageSet, Normalizer
from kdflow.engine.loop import fit

CPU = torch.device("cpu")


def quadrants(n: int, seed: int) -> ImageSet:
    """8×8 one-channel uint8 images, 4 classes: the class is which quadrant is bright; the rest is noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randint(0, 60, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 150
    return ImageSet(x, y)


TRAIN, VAL, SOURCE = quadrants(200, 1), quadrants(80, 2), quadrants(64, 3)
NORM = Normalizer([0.5], [0.5])


def cfg(epochs: int = 6, **kw) -> TrainConfig:
    return TrainConfig(**{"epochs": epochs, "batch_size": 32, "lr": 0.05, **kw})


def train_quadrants(model: nn.Module, config: TrainConfig, **kw):
    """`fit` on the quadrant task with the fixed normaliser, seed 0 and the CPU."""
    return fit(model, TRAIN, VAL, config, NORM, seed=0, device=CPU, **kw)


def cnn(width: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.build("cnn", in_channels=1, num_classes=4, width=width)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's weights and buffers, unaffected by later training."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

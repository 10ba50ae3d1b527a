"""A small CNN for the quickstart: ``nmcli prune py:examples/small_cnn.py:build``."""

from __future__ import annotations

import torch
from torch import nn


def build() -> nn.Module:
    """A 4-conv, 2-linear CNN for 3x32x32 images (CIFAR-sized), random weights with a fixed seed."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.BatchNorm2d(128),
        nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1, groups=128),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )

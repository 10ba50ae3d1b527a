"""Small real architectures the tests build (random init), loaded as ``py:<this file>:<factory>``."""

from __future__ import annotations

import torch
from torch import nn


def tiny_cnn() -> nn.Module:
    """A CNN with a stem conv (3 inputs: skipped), a grouped conv (skipped), prunable convs and Linears."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=4),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(32 * 16, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def tiny_mlp() -> nn.Module:
    """A 3-layer MLP on 64 features (the size of scikit-learn's digits)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


class TinyAttention(nn.Module):
    """``nn.MultiheadAttention`` (fused in_proj_weight) followed by a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(out)


def tiny_attention() -> nn.Module:
    return TinyAttention()


def digits_bn_cnn() -> nn.Module:
    """A BatchNorm CNN for scikit-learn's 8x8 digits (``1x1x8x8``): a stem conv (1 input channel:
    skipped), prunable 3x3 and 1x1 convs, a depthwise conv (skipped), dropout and a Linear head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )

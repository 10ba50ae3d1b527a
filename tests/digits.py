"""scikit-learn's digits for tests and benchmarks: a fixed stratified split and a dense training recipe."""

from __future__ import annotations

import torch
from torch import nn


def digits_split(images: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, x_test, y_train, y_test)``: 1347 / 450 examples, pixels in [0, 1]; ``images`` gives ``Nx1x8x8``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    if images:
        x = x.reshape(-1, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_train, x_test, y_train, y_test


def train_dense(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 10, lr: float = 0.05) -> nn.Module:
    """SGD (momentum 0.9, one-cycle schedule, batch 32, seed 0) with cross-entropy; returns the model in eval mode."""
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    per_epoch = (len(x) + 31) // 32
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * per_epoch)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = order[i : i + 32]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in eval mode (float64 mean)."""
    with torch.no_grad():
        return float((model.eval()(x).argmax(-1) == y).double().mean())

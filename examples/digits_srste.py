"""A small reproduction of the SR-STE paper's comparison on real data: scikit-learn's digits.

Trains a dense MLP, then dense vs 2:4 and 1:4 sparsity with vanilla STE vs SR-STE, starting both
from the pruned pretrained model and from scratch, and prints a table of test accuracy and SAD
(the share of mask bits that flip) between consecutive epochs. Uses nmcli's library API
(:class:`nmcli.algorithms.srste.SparseTraining`, :func:`nmcli.pipelines.sad.compare_masks`) directly.

    python examples/digits_srste.py [--epochs 15] [--lambda-w 0.02] [--seed 0]

Needs scikit-learn (``pip install 'nmcli[dev]'``). Runs in well under a minute on a laptop CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from nmcli.algorithms.srste import SparseTraining
from nmcli.formats.checkpoint import LayerEntry
from nmcli.models.layers import find_layers
from nmcli.nm.pattern import Pattern
from nmcli.pipelines.sad import compare_masks


def load_digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits set (1797 8x8 images), 75/25 stratified split, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.data / 16.0, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    f32 = torch.float32
    return torch.tensor(x_tr, dtype=f32), torch.tensor(y_tr), torch.tensor(x_te, dtype=f32), torch.tensor(y_te)


def mlp(seed: int) -> nn.Module:
    """64 -> 128 -> 64 -> 10, every layer's input a multiple of 4."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = 100.0 * float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def train(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    lr: float,
    seed: int,
    sparse: SparseTraining | None = None,
) -> tuple[float, list[float]]:
    """SGD with momentum and a cosine schedule; returns the final test accuracy and SAD per epoch."""
    x_tr, y_tr, x_te, y_te = data
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    steps = epochs * ((len(x_tr) + 63) // 64)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    gen = torch.Generator().manual_seed(seed)
    sads: list[float] = []
    previous = sparse.masks() if sparse else None
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x_tr), generator=gen).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            optimizer.step()
            schedule.step()
            if sparse:
                sparse.step()
        if sparse and previous is not None:
            current = sparse.masks()
            sads.append(compare_masks(previous, current).normalized)
            previous = current
    return accuracy(model, x_te, y_te), sads


def sparse_run(
    start: nn.Module, pattern: Pattern, lambda_w: float, data: tuple, epochs: int, lr: float, seed: int
) -> tuple[float, float, list[float]]:
    """Train ``start`` under N:M with SR-STE (``lambda_w`` 0: STE); returns one-shot and final accuracy, SADs."""
    entries = [
        LayerEntry(c.param, c.module, pattern.n, pattern.m, c.axis, c.shape)
        for c in find_layers(start, pattern)
        if c.eligible
    ]
    sparse = SparseTraining(start, entries, lambda_w=lambda_w)
    one_shot = accuracy(start, data[2], data[3])
    final, sads = train(start, data, epochs=epochs, lr=lr, seed=seed, sparse=sparse)
    return one_shot, final, sads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--lambda-w", type=float, default=0.02, help="SR-STE lambda_w for the sr rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    started = time.perf_counter()
    data = load_digits_split(args.seed)

    dense = mlp(args.seed)
    dense_acc, _ = train(dense, data, epochs=args.epochs, lr=args.lr, seed=args.seed)
    pretrained = {k: v.clone() for k, v in dense.state_dict().items()}

    rows = [("dense", "-", "-", "-", f"{dense_acc:.2f}", "-", "-")]
    for pattern in (Pattern(2, 4), Pattern(1, 4)):
        for start_from in ("pretrained", "scratch"):
            for method, lam in (("STE", 0.0), ("SR-STE", args.lambda_w)):
                model = mlp(args.seed)
                if start_from == "pretrained":
                    model.load_state_dict(pretrained)
                one_shot, final, sads = sparse_run(model, pattern, lam, data, args.epochs, args.lr, args.seed)
                rows.append(
                    (
                        str(pattern),
                        start_from,
                        method,
                        f"{one_shot:.2f}" if start_from == "pretrained" else "-",
                        f"{final:.2f}",
                        f"{100 * sads[0]:.2f}",
                        f"{100 * sum(sads[-5:]) / len(sads[-5:]):.3f}",
                    )
                )
    header = ("pattern", "start", "method", "one-shot acc %", "test acc %", "SAD ep1 %", "SAD last 5 ep %")
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
    print(
        f"\ndigits: {len(data[0])} train / {len(data[2])} test, MLP 64-128-64-10, {args.epochs} epochs of SGD "
        f"(lr {args.lr}, momentum 0.9, cosine), SR-STE lambda_w {args.lambda_w}; SAD = share of mask bits that "
        f"flip between consecutive epochs; {time.perf_counter() - started:.0f}s"
    )


if __name__ == "__main__":
    main()

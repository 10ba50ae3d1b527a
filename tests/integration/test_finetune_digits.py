"""A 1:4-pruned MLP on scikit-learn's digits recovers to within 1 point of its dense test accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fixtures.models import tiny_mlp
from nmcli.commands.finetune import run_finetune
from nmcli.commands.prune import run_prune
from nmcli.models.sources import load_model
from nmcli.pipelines.training import FinetuneConfig
from tests.conftest import py_source


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    digits = datasets.load_digits()
    x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
        digits.data / 16.0, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_x(x_tr), torch.tensor(y_tr), as_x(x_te), torch.tensor(y_te)


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((model.eval()(x).argmax(1) == y).float().mean())


def test_one_of_four_digits_mlp_recovers(tmp_path: Path) -> None:
    x_tr, y_tr, x_te, y_te = _digits()
    dense = tiny_mlp()
    optimizer = torch.optim.Adam(dense.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):  # a dense baseline: 12 epochs of Adam
        for idx in torch.randperm(len(x_tr), generator=gen).split(64):
            optimizer.zero_grad()
            F.cross_entropy(dense(x_tr[idx]), y_tr[idx]).backward()
            optimizer.step()
    dense_acc = _accuracy(dense, x_te, y_te)
    assert dense_acc > 94.0
    weights = tmp_path / "mlp.safetensors"
    save_file(dense.state_dict(), str(weights))
    pruned = tmp_path / "mlp-1of4.safetensors"
    run_prune(str(weights), pattern="1:4", arch=py_source("tiny_mlp"), keep_dense=True, output=pruned)
    one_shot = _accuracy(load_model(str(pruned)).model, x_te, y_te)
    data = tmp_path / "train.safetensors"
    save_file({"inputs": x_tr, "targets": y_tr}, str(data))
    out = tmp_path / "mlp-1of4-ft.safetensors"
    cfg = FinetuneConfig(data=f"tensors:{data}", epochs=12, batch_size=64, lr=0.05, device="cpu")
    result = run_finetune(pruned, cfg, output=out)
    recovered = _accuracy(load_model(str(out)).model, x_te, y_te)
    print(
        f"digits 1:4: dense {dense_acc:.2f}%, one-shot {one_shot:.2f}%, SR-STE {recovered:.2f}% ({result.steps} steps)"
    )
    assert one_shot < dense_acc - 5.0  # pruning 75% of the weights really hurt
    assert recovered >= dense_acc - 1.0

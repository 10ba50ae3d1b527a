"""The card's second line, ``nmcli export CKPT --onnx``/``--trt --sparse``, on checkpoints pruned from
a TorchScript archive (``torch.jit.script``/``trace``) or a ``torch.export`` program saved as ``.pt``
or ``.pt2`` (issue 13), and ``bench``/``finetune`` on them: never exit 4 (issue 11).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fixtures.models import tiny_cnn
from nmcli.cli.app import app
from nmcli.formats.open import load_checkpoint

SHAPE = (2, 3, 8, 8)


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture()
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def save_model(kind: str, model: nn.Module, name: str = "model") -> str:
    """Save ``model`` as the user would: scripted, traced, or torch.export'ed to ``.pt``/``.pt2``."""
    model = model.eval()
    example = torch.randn(*SHAPE)
    if kind == "script":
        torch.jit.save(torch.jit.script(model), f"{name}.pt")
        return f"{name}.pt"
    if kind == "trace":
        torch.jit.save(torch.jit.trace(model, (example,)), f"{name}.pt")
        return f"{name}.pt"
    suffix = ".pt2" if kind == "exported.pt2" else ".pt"
    torch.export.save(torch.export.export(model, (example,)), f"{name}{suffix}")
    return f"{name}{suffix}"


def initializers(path: Path) -> dict[str, torch.Tensor]:
    from onnx import numpy_helper

    return {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("kind", ["script", "trace", "exported.pt", "exported.pt2"])
def test_export_of_a_checkpoint_pruned_from_a_compiled_model(cwd: Path, kind: str) -> None:
    source = save_model(kind, tiny_cnn())
    # A torch.export program records its input shape (prune stores it); TorchScript does not.
    shape = [] if kind.startswith("exported") else ["--input-shape", "x".join(map(str, SHAPE))]
    code, _, err = run("prune", source, "--pattern", "2:4", *shape)
    assert code == 0, err
    ckpt = load_checkpoint(cwd / "model-2of4.safetensors")
    assert ckpt.meta.input_spec == "2x3x8x8"
    if kind != "trace":  # a traced conv keeps no ``groups`` attribute: its grouped conv 5 is not seen as one
        assert sorted(ckpt.masks) == ["10.weight", "2.weight", "8.weight"]
    code, out, err = run("export", "model-2of4.safetensors", "--onnx", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["verified"] is True and data["lost_layers"] == []
    assert sorted(m["param"] for m in data["sparse_initializers"]) == sorted(ckpt.masks)
    # The checkpoint's effective (pruned) weights are what reached the graph, not the source's dense ones.
    found = initializers(cwd / "model-2of4.onnx")
    for match in data["sparse_initializers"]:
        weight = found[match["initializer"]]
        effective = ckpt.tensors[match["param"]]
        assert weight.shape == effective.shape
        if match["param"] in ("2.weight", "5.weight"):  # BatchNorm folded into conv 2: its zeros stay exact zeros
            assert torch.equal(weight == 0, effective == 0)
        else:
            assert torch.equal(weight, effective)


def test_export_without_input_shape_or_with_a_fixed_batch_is_exit_2(cwd: Path) -> None:
    save_model("script", tiny_cnn(), "scripted")
    assert run("prune", "scripted.pt", "-p", "2:4")[0] == 0
    code, _, err = run("export", "scripted-2of4.safetensors")
    assert code == 2 and "--input-shape" in err
    code, _, err = run("export", "scripted-2of4.safetensors", "--input-shape", "2x3x8")
    assert code == 2 and "does not run on inputs 2x3x8" in err and "Traceback" not in err
    save_model("exported.pt", tiny_cnn(), "fixed")
    assert run("prune", "fixed.pt", "-p", "2:4")[0] == 0
    code, _, err = run("export", "fixed-2of4.safetensors", "--dynamic-batch")
    assert code == 2, err
    assert "--dynamic-batch" in err and "Guard failed" in err
    assert not list(cwd.glob("*.onnx"))


class Eigen(nn.Module):
    """Runs in torch; no ONNX exporter of torch 2.13 has ``linalg.eigh``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return torch.linalg.eigh(h.T @ h)[0]


@pytest.mark.parametrize("kind", ["script", "exported.pt2"])
def test_a_model_torch_cannot_export_is_exit_3(cwd: Path, kind: str) -> None:
    model = Eigen().eval()
    if kind == "script":
        torch.jit.save(torch.jit.script(model), "eig.pt")
        source = "eig.pt"
    else:
        torch.export.save(torch.export.export(model, (torch.randn(4, 16),)), "eig.pt2")
        source = "eig.pt2"
    assert run("prune", source, "-p", "2:4", "--input-shape", "4x16")[0] == 0
    code, out, err = run("export", "eig-2of4.safetensors", "--json")
    assert code == 3, err
    assert json.loads(out)["error"]["code"] == 3
    assert "linalg_eigh" in err and "internal error" not in err
    assert not list(cwd.glob("*.onnx"))


@pytest.mark.parametrize("kind", ["trace", "exported.pt"])
def test_bench_and_finetune_of_compiled_sources(cwd: Path, kind: str) -> None:
    from safetensors.torch import save_file

    source = save_model(kind, tiny_cnn())
    shape = [] if kind.startswith("exported") else ["--input-shape", "x".join(map(str, SHAPE))]
    assert run("prune", source, "-p", "2:4", *shape)[0] == 0
    code, out, err = run("bench", "model-2of4.safetensors", "--json", "--iters", "3", "--warmup", "1")
    assert code == 0, err
    assert sorted({r["variant"] for r in json.loads(out)["results"]}) == ["dense", "sparse"]
    save_file({"inputs": torch.randn(8, 3, 8, 8), "targets": torch.randint(0, 10, (8,))}, "data.safetensors")
    code, _, err = run("finetune", "model-2of4.safetensors", "--data", "tensors:data.safetensors", "--steps", "1",
                       "--batch-size", "2", "-o", "ft.safetensors")  # fmt: skip
    assert code == 2, err
    assert ("TorchScript" if kind == "trace" else "torch.export") in err and "--arch" in err
    assert not (cwd / "ft.safetensors").exists()

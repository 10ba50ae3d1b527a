"""The project card's usage lines work as written on the files users have (issue 13).

``nmcli prune model.pt --pattern 2:4`` on a TorchScript archive and on an ExportedProgram saved
as ``.pt``; ``nmcli inspect FILE.pt`` on a training checkpoint (a CI gate); ``nmcli export
--trt --sparse`` (exit 3 without TensorRT; on TorchScript/torch.export sources:
tests/cli/test_card_export_cli.py). ``nmcli sad a.pt b.pt``: tests/cli/test_sad_training_cli.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.formats.open import load_checkpoint
from nmcli.nm.masks import apply_mask, is_compliant, nm_mask
from nmcli.nm.pattern import Pattern


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture()
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("kind", ["torchscript", "exported"])
def test_prune_model_pt_as_written(cwd: Path, kind: str) -> None:
    net = Net().eval()
    if kind == "torchscript":
        torch.jit.save(torch.jit.script(net), "model.pt")
    else:
        torch.export.save(torch.export.export(net, (torch.randn(2, 16),)), "model.pt")
    code, _, err = run("prune", "model.pt", "--pattern", "2:4")
    assert code == 0, err
    ckpt = load_checkpoint(cwd / "model-2of4.safetensors")
    assert sorted(ckpt.masks) == ["fc1.weight", "fc2.weight"]
    assert all(is_compliant(ckpt.tensors[p], Pattern(2, 4), 1) for p in ckpt.masks)


def test_prune_pickled_module_and_state_dict_say_what_to_pass(cwd: Path) -> None:
    torch.save(Net(), "pickled.pt")
    code, _, err = run("prune", "pickled.pt", "--pattern", "2:4")
    assert code == 2 and "--trust" in err
    torch.save({"state_dict": Net().state_dict(), "epoch": 1}, "state.pt")
    code, _, err = run("prune", "state.pt", "--pattern", "2:4")
    assert code == 2 and "--arch" in err
    assert not list(cwd.glob("*.safetensors"))


def test_inspect_training_checkpoint_is_a_ci_gate(cwd: Path) -> None:
    state = Net().state_dict()
    torch.save({"epoch": 9, "state_dict": {f"module.{k}": v for k, v in state.items()}}, "dense.pth")
    code, out, err = run("inspect", "dense.pth", "--strict", "--json")
    assert code == 1, err
    data = json.loads(out)
    assert data["pattern"] == "2:4" and data["compliant"] is False
    assert [(x["param"], x["eligible"], x["kind"]) for x in data["layers"]] == [
        ("fc1.weight", True, "inferred"),
        ("fc2.weight", True, "inferred"),
    ]
    for name in ("fc1.weight", "fc2.weight"):
        state[name] = apply_mask(state[name], nm_mask(state[name], Pattern(2, 4), 1))
    torch.save({"epoch": 10, "state_dict": state}, "sparse.pth")
    code, out, err = run("inspect", "sparse.pth", "--strict")
    assert code == 0, err
    assert "inferred from the zeros" in " ".join(err.split()) and "2 of 2 eligible layers are 2:4" in err
    code, _, err = run("inspect", "sparse.pth", "--strict", "-p", "1:4")
    assert code == 1


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_export_trt_sparse_without_tensorrt_exits_3(cwd: Path) -> None:
    from tests.conftest import py_source

    code, _, err = run(
        "prune", py_source("tiny_mlp"), "--pattern", "2:4", "--input-shape", "1x64", "-o", "model-2of4.safetensors"
    )
    assert code == 0, err
    code, _, err = run("export", "model-2of4.safetensors", "--trt", "--sparse")
    assert code == 3, err
    assert "tensorrt" in err.lower()


ROOT = Path(__file__).resolve().parents[2]
CARD_MARK = "# the project card's three lines"


def _quickstart_lines() -> tuple[str, list[str]]:
    """The quickstart's CNN prune line, and the card's lines as the README writes them."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quickstart", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("  #", 1)[0].strip() for line in block.splitlines()]
    card = block.split(CARD_MARK, 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return lines[1], [line.split("  #", 1)[0].strip() for line in card]


def test_readme_card_lines_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shlex

    cnn_line, card = _quickstart_lines()
    assert [line.split()[:2] for line in card] == [
        ["nmcli", "prune"],
        ["nmcli", "export"],
        ["nmcli", "sad"],
        ["nmcli", "inspect"],
    ]
    assert card[0] == "nmcli prune model.pt --pattern 2:4" and card[2] == "nmcli sad a.pt b.pt"
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    # a torch.export archive saved as .pt records its input shape, so the export line needs no
    # --input-shape (a TorchScript one: tests/cli/test_card_export_cli.py)
    torch.export.save(torch.export.export(Net().eval(), (torch.randn(2, 16),)), "model.pt")
    net = Net()
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, "a.pt")
    with torch.no_grad():
        net.fc1.weight.add_(0.05 * torch.randn_like(net.fc1.weight))
    torch.save({"epoch": 2, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, "b.pt")
    trt = importlib.util.find_spec("tensorrt") is not None
    expected = [0, 0, 0 if trt else 3, 0, 1]  # inspect --strict of a dense checkpoint: exit 1
    for line, code in zip([cnn_line, *card], expected, strict=True):
        words = shlex.split(line)
        assert words[0] == "nmcli"
        got, _, err = run(*words[1:])
        assert got == code, f"{line}: {err}"
        assert "Traceback" not in err
    assert (tmp_path / "model-2of4.safetensors").is_file()
    assert (tmp_path / "model-2of4.onnx").is_file()  # the card's export line exported the card's checkpoint


def _chain_source(kind: str) -> tuple[str, list[str], list[str]]:
    """Save ``Net`` as the user has it: ``(file, extra prune options, extra export options)``."""
    from fixtures.models import tiny_mlp

    net = Net().eval()
    if kind == "traced":  # the example input's shape is kept in the archive (traced_inputs.pkl)
        torch.jit.save(torch.jit.trace(net, (torch.randn(2, 16),)), "model.pt")
        return "model.pt", [], []
    if kind == "exported":
        torch.export.save(torch.export.export(net, (torch.randn(2, 16),)), "model.pt2")
        return "model.pt2", [], []
    mlp = tiny_mlp().eval()  # a class importable by name (fixtures.models), as a pickle needs
    if kind == "pickled":
        torch.save(mlp, "model.pt")
        return "model.pt", ["--trust"], []
    torch.save(mlp.state_dict(), "model.pt")
    from tests.conftest import py_source

    if kind == "state-dict-arch":
        return "model.pt", ["--arch", py_source("tiny_mlp")], []
    return "model.pt", ["--infer-layers"], ["--arch", py_source("tiny_mlp")]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
@pytest.mark.parametrize("kind", ["traced", "exported", "pickled", "state-dict-arch", "state-dict-infer"])
def test_card_chain_prune_export_sad(cwd: Path, kind: str) -> None:
    """The card's three lines in order (issue 23): prune, export --trt --sparse (exit 3 with the
    trtexec line, no TensorRT here), sad of the source and the checkpoint. No --input-shape anywhere."""
    source, prune_extra, export_extra = _chain_source(kind)
    code, _, err = run("prune", source, "--pattern", "2:4", *prune_extra)
    assert code == 0, err
    ckpt = load_checkpoint(cwd / "model-2of4.safetensors")
    # prune records the input shape it learned (--infer-layers has no model: export learns it from --arch)
    assert bool(ckpt.meta.input_spec) is (kind != "state-dict-infer")
    layers = 2 if kind in ("traced", "exported") else 3  # Net or tiny_mlp: weights only, never biases
    assert f"pruned {layers} of {layers} layers" in err
    if kind == "state-dict-infer":  # the model cannot be rebuilt: one line naming what works
        code, _, err = run("export", "model-2of4.safetensors", "--trt", "--sparse")
        assert code == 2 and "--infer-layers" not in err.split(";")[-1], err
        assert "--arch SPEC" in err and "--format plain" in err and len(err.strip().splitlines()) == 1
    code, _, err = run("export", "model-2of4.safetensors", "--trt", "--sparse", *export_extra)
    assert code == 3, err
    assert "trtexec --onnx=model-2of4.onnx --saveEngine=model-2of4.engine --sparsity=enable" in err
    assert (cwd / "model-2of4.onnx").is_file()
    code, _, err = run("sad", source, "model-2of4.safetensors", *prune_extra[:1] if kind == "pickled" else [])
    assert code == 0, err
    assert "SAD 0 of" in err
    assert "Traceback" not in err

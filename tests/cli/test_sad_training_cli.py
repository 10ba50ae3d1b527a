"""``nmcli sad A B`` on training checkpoints as training scripts save them (issue 13).

Two checkpoints saved like an ImageNet training script saves them (``epoch``, ``arch``,
``state_dict`` with DataParallel's ``module.`` prefixes, ``optimizer`` state) for a small CNN with
a stem conv, a depthwise conv, BatchNorm and Linears: ``nmcli sad a.pth b.pth`` with no flags
counts the XOR of the N:M masks over the eligible layers only, the layers inferred from the
tensors (stem: 3 input channels; depthwise: input dimension 1; BatchNorm: 1-D).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.nm.masks import apply_mask, nm_mask
from nmcli.nm.pattern import Pattern

ELIGIBLE = ["conv.weight", "fc1.weight", "fc2.weight"]


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)  # input dim 3: not a multiple of M
        self.bn1 = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)  # depthwise: [32, 1, 3, 3]
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(self.bn2(self.conv(x)))
        x = self.dw(x).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _train_step(model: nn.Module, seed: int) -> torch.optim.Optimizer:
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    loss = model(torch.randn(4, 3, 8, 8)).square().mean()
    loss.backward()
    opt.step()
    return opt


def _imagenet_style(path: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int) -> Path:
    """What the PyTorch ImageNet example saves: DataParallel keys, optimizer state, metadata."""
    torch.save(
        {
            "epoch": epoch,
            "arch": "smallcnn",
            "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
            "best_acc1": torch.tensor(12.5),
            "optimizer": opt.state_dict(),
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a = SmallCNN()
    b = SmallCNN()
    b.load_state_dict(a.state_dict())
    _train_step(b, 1)
    return a, b


@pytest.fixture(scope="module")
def pair(models: tuple[nn.Module, nn.Module], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("train")
    a, b = models
    return (
        _imagenet_style(folder / "a.pth", a, torch.optim.SGD(a.parameters(), lr=0.1), 1),
        _imagenet_style(folder / "b.pth", b, _train_step(b, 2), 2),
    )


def _xor(a: nn.Module, b: nn.Module, pattern: Pattern) -> tuple[dict[str, int], int]:
    sa, sb = a.state_dict(), b.state_dict()
    per = {p: int((nm_mask(sa[p], pattern, 1) ^ nm_mask(sb[p], pattern, 1)).sum()) for p in ELIGIBLE}
    return per, sum(sa[p].numel() for p in ELIGIBLE)


def test_two_training_checkpoints_no_flags(pair: tuple[Path, Path], models: tuple[nn.Module, nn.Module]) -> None:
    code, out, err = run("sad", str(pair[0]), str(pair[1]), "--json")
    assert code == 0, err
    data = json.loads(out)
    per, total = _xor(*models, Pattern(2, 4))
    assert {layer["param"]: layer["sad"] for layer in data["layers"]} == per
    assert data["sad"] == sum(per.values()) > 0 and data["total"] == total
    assert (data["pattern"], data["pattern_from"]) == ("2:4", "default")
    entry = data["masks"][0]
    assert entry["layers_from"] == "inferred" and "prefix 'module.' stripped" in entry["checkpoint"]
    reasons = {t["param"]: t["reason"] for t in entry["tensors"]}
    assert "not a multiple of M=4" in reasons["stem.weight"]
    assert "depthwise" in reasons["dw.weight"]
    assert "1-D" in reasons["bn1.weight"] and "bias" in reasons["bn1.running_mean"]
    assert [p for p, r in reasons.items() if not r] == ELIGIBLE


def test_table_names_the_rule_inferred(pair: tuple[Path, Path]) -> None:
    code, out, err = run("sad", str(pair[0]), str(pair[1]))
    assert code == 0, err
    assert out == ""
    assert "inferred from its tensors" in err and "the same layers, inferred the same way" in err
    assert "masks derived with 2:4; pass -p N:M to choose" in " ".join(err.split())


def test_pattern_option_1_of_4(pair: tuple[Path, Path], models: tuple[nn.Module, nn.Module]) -> None:
    code, out, err = run("sad", str(pair[0]), str(pair[1]), "-p", "1:4", "--json")
    assert code == 0, err
    data = json.loads(out)
    per, total = _xor(*models, Pattern(1, 4))
    assert {layer["param"]: layer["sad"] for layer in data["layers"]} == per and data["total"] == total
    assert (data["pattern"], data["pattern_from"]) == ("1:4", "option")


def test_effective_weight_checkpoints_infer_1_of_4(models: tuple[nn.Module, nn.Module], tmp_path: Path) -> None:
    p14 = Pattern(1, 4)
    paths = []
    for name, model in zip(("a", "b"), models, strict=True):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for p in ELIGIBLE:
            state[p] = apply_mask(state[p], nm_mask(state[p], p14, 1))
        paths.append(tmp_path / f"{name}.pt")
        torch.save({"model": state, "epoch": 0}, paths[-1])
    code, out, err = run("sad", *map(str, paths), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert (data["pattern"], data["pattern_from"]) == ("1:4", "inferred")
    per, _ = _xor(*models, p14)
    assert data["sad"] == sum(per.values())
    code, _, err = run("sad", *map(str, paths))
    assert code == 0 and "pattern 1:4 inferred from the zeros stored in a.pt, b.pt" in " ".join(err.split())


def test_pickled_module_is_exit_2_and_nothing_is_unpickled(models: tuple[nn.Module, nn.Module], tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"

    class Canary:
        def __reduce__(self) -> tuple[object, tuple[object, ...]]:
            return (Path.touch, (marker,))

    path = tmp_path / "model.pt"
    torch.save({"model": models[0], "canary": Canary()}, path)
    code, _, err = run("sad", str(path), str(path))
    assert code == 2, err
    assert "nothing was unpickled" in err and "--trust" in err and "Traceback" not in err
    assert not marker.exists()
    whole = tmp_path / "whole.pt"
    torch.save(models[0], whole)
    code, _, err = run("sad", str(whole), str(whole))
    assert code == 2 and "--trust" in err


def test_key_prefixes_and_mixing_with_safetensors(models: tuple[nn.Module, nn.Module], tmp_path: Path) -> None:
    a, b = models
    compiled = {f"_orig_mod.{k}": v for k, v in a.state_dict().items()}
    torch.save({"state_dict": compiled, "state_dict_ema": b.state_dict(), "epoch": 3}, tmp_path / "c.pth.tar")
    save_file({k: v.contiguous() for k, v in b.state_dict().items()}, str(tmp_path / "b.safetensors"))
    per, _ = _xor(a, b, Pattern(2, 4))
    code, out, err = run("sad", str(tmp_path / "c.pth.tar"), str(tmp_path / "b.safetensors"), "--json")
    assert code == 0, err
    assert json.loads(out)["sad"] == sum(per.values())
    # --key picks the EMA weights: the same as b
    code, out, err = run(
        "sad", str(tmp_path / "c.pth.tar"), str(tmp_path / "b.safetensors"), "--key", "state_dict_ema", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["sad"] == 0
    code, _, err = run("sad", str(tmp_path / "c.pth.tar"), str(tmp_path / "c.pth.tar"), "--key", "ema")
    assert code == 2 and "no entry 'ema'" in err and "state_dict_ema" in err


def test_arch_takes_precedence(pair: tuple[Path, Path], tmp_path: Path) -> None:
    factory = tmp_path / "cnnfactory.py"
    factory.write_text("from tests.cli.test_sad_training_cli import SmallCNN\n\ndef build():\n    return SmallCNN()\n")
    code, out, err = run("sad", str(pair[0]), str(pair[1]), "--arch", f"py:{factory}:build", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["masks"][0]["layers_from"] == "arch" and "tensors" not in data["masks"][0]
    assert [layer["param"] for layer in data["layers"]] == ELIGIBLE


def test_directory_input_says_so(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    code, _, err = run("sad", str(tmp_path), str(pair[0]))
    assert code == 2 and "is a directory" in err and "--pattern" not in err


def test_mixes_with_an_nmcli_checkpoint(tmp_path: Path) -> None:
    """A stored-mask checkpoint against a training checkpoint of effective weights: the pattern
    comes from the zeros (it agrees with the stored one) and the SAD is the XOR of the two masks."""
    from nmcli.commands.prune import run_prune
    from nmcli.formats.open import load_checkpoint
    from tests.conftest import py_source

    a = tmp_path / "a.safetensors"
    run_prune(py_source("tiny_mlp"), pattern="2:4", output=str(a))
    stored = load_checkpoint(a)
    state = {k: v.clone() for k, v in stored.tensors.items()}
    torch.manual_seed(5)
    masks_b = {}
    for p in stored.masks:
        dense = state[p] + 0.05 * torch.randn_like(state[p])
        masks_b[p] = nm_mask(dense, Pattern(2, 4), 1)
        state[p] = apply_mask(dense, masks_b[p])
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "b.pth")
    code, out, err = run("sad", str(a), str(tmp_path / "b.pth"), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert (data["pattern"], data["pattern_from"]) == ("2:4", "inferred")
    assert [m["layers_from"] for m in data["masks"]] == ["stored", "inferred"]
    assert data["sad"] == sum(int((stored.masks[p] ^ masks_b[p]).sum()) for p in stored.masks) > 0
    assert data["one_sided"] == []
    state["extra.weight"] = torch.ones(4, 4)
    torch.save({"state_dict": state}, tmp_path / "c.pth")
    code, _, err = run("sad", str(a), str(tmp_path / "c.pth"))
    assert code == 2 and "extra.weight" in err

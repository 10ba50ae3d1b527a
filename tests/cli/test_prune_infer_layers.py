"""``nmcli prune STATE.pt --infer-layers``: a bare training state dict pruned without --arch (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from fixtures.models import tiny_cnn
from nmcli.cli.app import app
from nmcli.formats.open import load_checkpoint
from nmcli.nm.masks import is_compliant
from nmcli.nm.pattern import parse_pattern

runner = CliRunner()


def test_training_checkpoint_prunes_with_inferred_layers(workdir: Path) -> None:
    model = tiny_cnn()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, "train.pth")
    plain = runner.invoke(app, ["prune", "train.pth", "-p", "2:4", "-o", "x.safetensors"])
    assert plain.exit_code == 2 and "--infer-layers" in plain.stderr
    result = runner.invoke(app, ["prune", "train.pth", "-p", "2:4", "--infer-layers", "-o", "x.safetensors", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    pruned = {layer["param"] for layer in report["layers"] if layer["status"] == "pruned"}
    # the stem conv (3 inputs) is skipped by shape; the grouped conv (32x8x3x3 of groups=4) cannot be told apart
    # from a plain conv by its tensor and is taken, which is why the rule is called "inferred"
    assert {"2.weight", "8.weight", "10.weight"} <= pruned and "0.weight" not in pruned
    ckpt = load_checkpoint(workdir / "x.safetensors")
    assert ckpt.meta.history[-1]["arguments"]["infer_layers"] is True
    for entry in ckpt.meta.layers:
        assert is_compliant(ckpt.tensors[entry.param], parse_pattern("2:4"), 1)
    both = runner.invoke(app, ["prune", "train.pth", "--infer-layers", "--arch", "py:x:y", "-o", "y.safetensors"])
    assert both.exit_code == 2 and "exclude each other" in both.stderr

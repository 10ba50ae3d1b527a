"""The whole chain on a tiny real CNN: prune -> finetune -> sad -> export -> inspect -> bench.

Each step reads the file the previous one wrote, through the CLI, so the checkpoint format, the
stored input spec and the history really chain the commands together.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.formats.open import load_checkpoint
from tests.conftest import py_source

runner = CliRunner()


def _json(args: list[str], code: int = 0) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def test_prune_finetune_sad_export_inspect_bench(tmp_path: Path) -> None:
    pruned = tmp_path / "cnn-2of4.safetensors"
    tuned = tmp_path / "cnn-2of4-ft.safetensors"
    onnx = tmp_path / "cnn-2of4-ft.onnx"
    gen = torch.Generator().manual_seed(0)
    data = tmp_path / "images.safetensors"
    save_file(
        {"inputs": torch.randn(64, 3, 8, 8, generator=gen), "targets": torch.randint(0, 10, (64,), generator=gen)},
        str(data),
    )

    prune = _json(["prune", py_source("tiny_cnn"), "--input-shape", "1x3x8x8", "--keep-dense", "-o", str(pruned)])
    pruned_params = [layer["param"] for layer in prune["layers"] if layer["status"] == "pruned"]
    assert pruned_params == ["2.weight", "8.weight", "10.weight"]

    # A large learning rate so that some masks really move.
    summary = _json(["finetune", str(pruned), "--data", f"tensors:{data}", "--steps", "4", "--batch-size", "16",
                     "--lr", "0.5", "--teacher", "none", "-o", str(tuned)])  # fmt: skip
    assert summary["steps"] == 4 and summary["sad_vs_start"] > 0

    # One SAD implementation: nmcli sad on the same pair gives finetune's figure.
    sad = _json(["sad", str(pruned), str(tuned)])
    assert sad["sad"] == summary["sad_vs_start"]
    assert [layer["param"] for layer in sad["layers"]] == pruned_params

    ckpt = load_checkpoint(tuned)
    assert [record["command"] for record in ckpt.meta.history] == ["prune", "finetune"]
    assert ckpt.meta.input_spec == "1x3x8x8"

    # export takes the input shape from the checkpoint, and every pruned layer stays N:M in the graph.
    export = _json(["export", str(tuned), "--onnx", "--dynamic-batch", "-o", str(onnx)])
    assert export["verified"] is True and export["lost_layers"] == []
    assert sorted(item["param"] for item in export["sparse_initializers"]) == sorted(pruned_params)

    inspected = _json(["inspect", str(onnx), "--strict"])
    assert inspected["compliant"] is True
    assert sum(1 for layer in inspected["layers"] if layer["eligible"] and layer["compliant"]) == len(pruned_params)

    bench = _json(["bench", str(onnx), "--batch-size", "1,2", "--iters", "3", "--warmup", "1"])
    assert bench["backend"] == "onnxruntime"
    assert [r["batch_size"] for r in bench["results"]] == [1, 2]
    assert all(r["latency_ms"]["p50"] > 0 for r in bench["results"])

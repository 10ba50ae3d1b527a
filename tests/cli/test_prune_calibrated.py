"""``nmcli prune --method wanda|sparsegpt --calib``: block by block on transformers, stage by stage on CNNs,
BatchNorm re-estimation, option errors, and the whole chain from a SparseGPT checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import Result
from safetensors.torch import save_file
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.formats.open import load_checkpoint
from nmcli.nm.masks import is_compliant
from nmcli.nm.pattern import parse_pattern
from tests.conftest import py_source

runner = CliRunner()


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def _one_error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "Traceback" not in result.output
    return lines[0]


@pytest.fixture()
def token_calib(workdir: Path) -> Path:
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (24, 16))
    mask = torch.ones(24, 16, dtype=torch.long)
    mask[::3, 10:] = 0  # some padding, which the statistics must skip
    path = workdir / "calib.safetensors"
    save_file({"input_ids": ids, "attention_mask": mask}, str(path))
    return path


def test_sparsegpt_on_gpt2_runs_block_by_block(workdir: Path, tiny_gpt2_dir: Path, token_calib: Path) -> None:
    result = invoke(
        "prune", f"hf:{tiny_gpt2_dir}", "--method", "sparsegpt", "--calib", f"tensors:{token_calib}",
        "--calib-samples", "16", "-o", "gpt2-sgpt.safetensors", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "sparsegpt" and report["calib_samples"] == 16
    assert any("block by block over the 2 blocks of transformer.h" in note for note in report["notes"])
    pruned = [layer for layer in report["layers"] if layer["status"] == "pruned"]
    assert len(pruned) == 8 and all(0 <= layer["recon_error"] < 1 for layer in pruned)
    assert "recon err %" in result.stderr  # the table, on stderr
    ckpt = load_checkpoint(workdir / "gpt2-sgpt.safetensors")
    for entry in ckpt.meta.layers:  # transformers Conv1D: groups along dim 0
        assert entry.axis == 0 and is_compliant(ckpt.tensors[entry.param], parse_pattern("2:4"), 0)
    assert ckpt.meta.history[-1]["arguments"]["calib"] == f"tensors:{token_calib}"
    assert invoke("inspect", "gpt2-sgpt.safetensors", "--strict").exit_code == 0


def _digit_images(workdir: Path) -> Path:
    sklearn = pytest.importorskip("sklearn.datasets")
    digits = sklearn.load_digits()
    images = torch.tensor(digits.data[:64], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    path = workdir / "images.safetensors"
    save_file({"inputs": images}, str(path))
    return path


def test_batchnorm_cnn_gets_its_statistics_reestimated(workdir: Path) -> None:
    images = _digit_images(workdir)
    common = [py_source("digits_bn_cnn"), "--method", "wanda", "--calib", f"tensors:{images}", "--json"]
    done = invoke("prune", *common, "-o", "on.safetensors")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["bn_recalibrated"] is True
    assert any("stage by stage" in note for note in report["notes"])
    off = invoke("prune", *common, "--no-bn-recalibrate", "-o", "off.safetensors")
    assert off.exit_code == 0 and json.loads(off.stdout)["bn_recalibrated"] is False
    on_ckpt, off_ckpt = load_checkpoint(workdir / "on.safetensors"), load_checkpoint(workdir / "off.safetensors")
    assert not torch.equal(on_ckpt.tensors["1.running_mean"], off_ckpt.tensors["1.running_mean"])
    # conv groups run along the input channels at every kernel position: inspect agrees
    assert invoke("inspect", "on.safetensors", "--strict").exit_code == 0
    human = invoke("prune", *common[:-1], "-o", "human.safetensors")
    assert "BatchNorm running statistics re-estimated on 64 calibration samples" in human.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--method", "sparsegpt"], "--method sparsegpt needs calibration data: pass --calib"),
        (["--method", "obs"], "unknown pruning method 'obs'"),
        (["--method", "wanda", "--calib", "tensors:missing.safetensors"], "--calib tensors:missing.safetensors"),
        (["--method", "wanda", "--calib", "csv:x.csv"], "unknown --calib spec 'csv:x.csv'"),
        (["--method", "wanda", "--calib", "tensors:x", "--damp", "nan"], "--damp"),
        (["--method", "wanda", "--calib", "tensors:x", "--calib-samples", "0"], "--calib-samples"),
        (["--method", "wanda", "--calib", "tensors:x", "--device", "tpu"], "--device 'tpu'"),
    ],
)
def test_bad_calibration_options_are_exit_2(workdir: Path, args: list[str], expected: str) -> None:
    result = invoke("prune", py_source("tiny_mlp"), *args, "-o", "out.safetensors")
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert not (workdir / "out.safetensors").exists()


def test_whole_chain_from_a_sparsegpt_checkpoint(workdir: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 64)
    save_file({"inputs": x, "targets": torch.randint(0, 10, (64,))}, str(workdir / "data.safetensors"))
    pruned = invoke(
        "prune", py_source("tiny_mlp"), "--method", "sparsegpt", "--calib", "tensors:data.safetensors",
        "--keep-dense", "--input-shape", "1x64", "-o", "mlp-sgpt.safetensors",
    )  # fmt: skip
    assert pruned.exit_code == 0, pruned.output
    tuned = invoke(
        "finetune", "mlp-sgpt.safetensors", "--data", "tensors:data.safetensors", "--steps", "2",
        "--batch-size", "16", "--device", "cpu", "-o", "mlp-ft.safetensors",
    )  # fmt: skip
    assert tuned.exit_code == 0, tuned.output
    sad = invoke("sad", "mlp-sgpt.safetensors", "mlp-ft.safetensors", "--json")
    assert sad.exit_code == 0, sad.output
    exported = invoke("export", "mlp-ft.safetensors", "--onnx", "-o", "mlp.onnx")
    assert exported.exit_code == 0, exported.output
    assert invoke("inspect", "mlp.onnx", "--strict").exit_code == 0
    assert invoke("inspect", "mlp-ft.safetensors", "--strict").exit_code == 0

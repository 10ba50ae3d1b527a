"""``nmcli export`` on the command line: --json, exit codes 1/2/3, the trtexec line, --compress."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.commands.prune import run_prune
from nmcli.formats.open import load_checkpoint
from tests.conftest import py_source

runner = CliRunner()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture()
def mlp_ckpt(tmp_path: Path) -> Path:
    ckpt = tmp_path / "mlp-2of4.safetensors"
    run_prune(py_source("tiny_mlp"), input_shape="4x64", output=ckpt)
    return ckpt


def test_json_is_one_object_with_the_contract_keys(mlp_ckpt: Path) -> None:
    result = runner.invoke(app, ["export", str(mlp_ckpt), "--onnx", "--dynamic-batch", "--json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert {"onnx", "engine", "verified", "max_abs_diff", "sparse_initializers", "lost_layers"} <= out.keys()
    assert out["onnx"] == str(mlp_ckpt.with_suffix(".onnx")) and Path(out["onnx"]).is_file()
    assert out["verified"] is True and out["engine"] is None and out["lost_layers"] == []
    assert sorted(s["param"] for s in out["sparse_initializers"]) == ["0.weight", "2.weight", "4.weight"]
    assert 0 <= out["max_abs_diff"] < 1e-4 and len(out["verify"]["runs"]) == 2


def test_existing_output_needs_force(mlp_ckpt: Path) -> None:
    assert runner.invoke(app, ["export", str(mlp_ckpt), "--no-verify"]).exit_code == 0
    again = runner.invoke(app, ["export", str(mlp_ckpt), "--no-verify"])
    assert again.exit_code == 2 and "--force" in again.stderr
    assert runner.invoke(app, ["export", str(mlp_ckpt), "--no-verify", "--force"]).exit_code == 0


def test_verification_outside_tolerance_exits_1_after_reporting(mlp_ckpt: Path) -> None:
    result = runner.invoke(
        app, ["export", str(mlp_ckpt), "--precision", "fp16", "--atol", "0", "--rtol", "0", "--json"]
    )
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["verified"] is False and out["max_abs_diff"] > 0
    assert "differs from the torch model" in result.stderr and Path(out["onnx"]).is_file()


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: the missing-backend path cannot happen")
def test_trt_without_tensorrt_exits_3_with_the_trtexec_line(mlp_ckpt: Path) -> None:
    out_engine = mlp_ckpt.parent / "mlp.engine"
    result = runner.invoke(
        app,
        [
            "export",
            str(mlp_ckpt),
            "--trt",
            "--sparse",
            "--precision",
            "fp16",
            "--dynamic-batch",
            "--workspace",
            "64",
            "-o",
            str(out_engine),
        ],
    )
    assert result.exit_code == 3
    onnx_path = mlp_ckpt.parent / "mlp.onnx"
    assert onnx_path.is_file() and not out_engine.exists()
    expected = (
        f"trtexec --onnx={onnx_path} --saveEngine={out_engine} --sparsity=enable --fp16 --memPoolSize=workspace:64 "
        "--minShapes=input:1x64 --optShapes=input:4x64 --maxShapes=input:32x64"
    )
    assert expected in result.stderr
    assert "--stronglyTyped" in result.stderr  # the TensorRT 11 form is given too


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_trt_hints_dense_engine_and_fp32_sparse(mlp_ckpt: Path) -> None:
    dense = runner.invoke(app, ["export", str(mlp_ckpt), "--trt", "--no-verify", "--json"])
    assert dense.exit_code == 3 and "--sparse" in " ".join(json.loads(dense.stdout)["notes"])
    assert json.loads(dense.stdout)["onnx"] is not None
    fp32 = runner.invoke(app, ["export", str(mlp_ckpt), "--trt", "--sparse", "--no-verify", "--force", "--json"])
    out = json.loads(fp32.stdout)
    assert fp32.exit_code == 3 and any("fp16" in n for n in out["notes"]) and "--sparsity=enable" in out["trtexec"]


def test_compress_writes_a_copy_that_export_reads(mlp_ckpt: Path) -> None:
    result = runner.invoke(app, ["export", str(mlp_ckpt), "--compress", "--json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    packed = Path(out["compressed"])
    assert out["onnx"] is None and packed.is_file() and out["compressed_bytes"] < 0.6 * out["original_bytes"]
    a, b = load_checkpoint(mlp_ckpt), load_checkpoint(packed)
    assert all((a.tensors[k] == b.tensors[k]).all() for k in a.tensors)
    again = runner.invoke(app, ["export", str(packed), "-o", str(packed.parent / "from-compressed.onnx"), "--json"])
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["verified"] is True and json.loads(again.stdout)["lost_layers"] == []


def test_bad_options_exit_2(mlp_ckpt: Path) -> None:
    bad = runner.invoke(app, ["export", str(mlp_ckpt), "--precision", "fp8"])
    assert bad.exit_code == 2 and "fp8" in bad.stderr
    wrong_o = runner.invoke(app, ["export", str(mlp_ckpt), "-o", "x.engine"])
    assert wrong_o.exit_code == 2 and ".onnx" in wrong_o.stderr

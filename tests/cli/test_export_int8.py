"""``nmcli export --precision int8|fp8 --calib``: a Q/DQ ONNX whose quantized weights keep 2:4 (issue 21).

Real onnxruntime runs on tiny models: quantize_static calibrates on the data, the int8 initializers are
checked for N:M, the Q/DQ model is compared with the float sparse one on held-out examples, and
``inspect --strict`` reads the weights behind DequantizeLinear.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.commands.prune import run_prune
from tests.conftest import py_source

runner = CliRunner()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2:4 tiny MLP checkpoint and 96 calibration rows of 64 features."""
    folder = tmp_path_factory.mktemp("int8")
    ckpt = folder / "mlp.safetensors"
    run_prune(py_source("tiny_mlp"), input_shape="1x64", output=ckpt)
    data = folder / "calib.safetensors"
    save_file({"inputs": torch.randn(96, 64, generator=torch.Generator().manual_seed(0))}, str(data))
    return ckpt, data


def _export(*args: str) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    result = runner.invoke(app, ["export", *args, "--json"])
    return result.exit_code, json.loads(result.stdout), result.stderr


def test_int8_without_calib_is_exit_2_naming_the_flag_and_writes_nothing(tmp_path: Path) -> None:
    ckpt = tmp_path / "mlp.safetensors"
    run_prune(py_source("tiny_mlp"), input_shape="1x64", output=ckpt)
    before = ckpt.read_bytes()
    for precision in ("int8", "fp8"):
        for extra in ((), ("--trt", "--sparse"), ("--onnx", "-o", str(tmp_path / "out.onnx"))):
            result = runner.invoke(app, ["export", str(ckpt), "--precision", precision, *extra])
            assert result.exit_code == 2, result.output
            assert "--calib" in result.stderr and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.safetensors"]
    assert ckpt.read_bytes() == before


def test_calib_that_does_not_fit_is_exit_2_before_anything_is_written(mlp: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = mlp
    bad = tmp_path / "bad.safetensors"
    save_file({"inputs": torch.randn(8, 32)}, str(bad))
    out = tmp_path / "m.onnx"
    code, payload, _ = _export(str(ckpt), "--precision", "int8", "--calib", f"tensors:{bad}", "-o", str(out))
    assert code == 2 and "--calib" in payload["error"]["message"] and "does not fit" in payload["error"]["message"]
    code, payload, _ = _export(
        str(ckpt), "--precision", "int8", "--calib", "tensors:missing.safetensors", "-o", str(out)
    )
    assert code == 2
    code, payload, _ = _export(str(ckpt), "--precision", "fp16", "--calib", f"tensors:{bad}", "-o", str(out))
    assert code == 2 and "--calib" in payload["error"]["message"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_int8_export_keeps_2of4_in_int8_weights_and_agrees_with_float(mlp: tuple[Path, Path], tmp_path: Path) -> None:
    import onnx

    ckpt, data = mlp
    out = tmp_path / "mlp-int8.onnx"
    code, payload, _ = _export(str(ckpt), "--precision", "int8", "--calib", f"tensors:{data}", "-o", str(out))
    assert code == 0, payload
    quant = payload["quantization"]
    assert quant["precision"] == "int8" and quant["calib_method"] == "max"
    assert [layer["dtype"] for layer in quant["sparse_layers"]] == ["int8"] * 3
    assert all(layer["compliant"] for layer in quant["sparse_layers"])
    agreement = quant["agreement"]
    assert agreement["examples"] >= 1 and agreement["cosine"] > 0.99 and agreement["top1_agreement"] >= 0.8
    assert [m["initializer"] for m in payload["sparse_initializers"]] == [
        layer["initializer"] for layer in quant["sparse_layers"]
    ]
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 3 and "DequantizeLinear" in ops
    inits = {i.name: i for i in model.graph.initializer}
    for layer in quant["sparse_layers"]:
        assert inits[layer["initializer"]].data_type == onnx.TensorProto.INT8
    zero_points = [onnx.numpy_helper.to_array(i) for n, i in inits.items() if n.endswith("zero_point")]
    assert zero_points and all((z == 0).all() for z in zero_points)  # symmetric, as TensorRT wants
    # GEMM inputs only: no quantizer on a Gemm/MatMul's raw output (before its bias and activation)
    producers = {o: n for n in model.graph.node for o in n.output}
    quantized = [producers.get(n.input[0]) for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert not [p.name for p in quantized if p is not None and p.op_type in ("Gemm", "MatMul", "Conv")]
    smoothing = quant["smoothing"]
    assert smoothing and quant["smoothed_inputs"] == sum(item["alpha"] is not None for item in smoothing)
    assert all(item["smoothed_int8_error"] <= item["int8_error"] for item in smoothing)
    assert runner.invoke(app, ["inspect", str(out), "--strict"]).exit_code == 0


def _dense_int8(data: Path, out: Path) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    """The int8 export of the unpruned tiny MLP (a dense baseline)."""
    return _export(
        py_source("tiny_mlp"),
        "--input-shape",
        "1x64",
        "--precision",
        "int8",
        "--calib",
        f"tensors:{data}",
        "-o",
        str(out),
    )


def test_int8_of_a_dense_model_fails_inspect_strict(mlp: tuple[Path, Path], tmp_path: Path) -> None:
    _, data = mlp
    out = tmp_path / "dense-int8.onnx"
    code, payload, _ = _dense_int8(data, out)
    assert code == 0, payload
    assert runner.invoke(app, ["inspect", str(out), "--strict"]).exit_code == 1


def test_int8_conv_net_and_percentile_calibration(tmp_path: Path) -> None:
    ckpt = tmp_path / "cnn.safetensors"
    run_prune(py_source("tiny_cnn"), input_shape="1x3x16x16", output=ckpt)
    data = tmp_path / "img.safetensors"
    save_file({"inputs": torch.randn(24, 3, 16, 16)}, str(data))
    code, payload, _ = _export(
        str(ckpt), "--precision", "int8", "--calib", f"tensors:{data}", "--calib-samples", "16",
        "--calib-method", "percentile",
    )  # fmt: skip
    assert code == 0, payload
    layers = payload["quantization"]["sparse_layers"]
    assert any(layer["node"].endswith("Conv") for layer in layers)
    assert all(layer["compliant"] and layer["dtype"] == "int8" for layer in layers)
    assert payload["quantization"]["agreement"]["cosine"] > 0.98
    assert Path(payload["onnx"]).name == "cnn-int8.onnx"


def test_fp8_export_checks_the_graph_and_reports_the_numerical_check(mlp: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, data = mlp
    out = tmp_path / "mlp-fp8.onnx"
    code, payload, _ = _export(str(ckpt), "--precision", "fp8", "--calib", f"tensors:{data}", "-o", str(out))
    assert code == 0, payload
    layers = payload["quantization"]["sparse_layers"]
    assert [layer["dtype"] for layer in layers] == ["float8e4m3fn"] * 3 and all(lay["compliant"] for lay in layers)
    agreement = payload["quantization"]["agreement"]
    # onnxruntime's CPU provider runs float8 Q/DQ (its extended fusions are off for the check: they are wrong
    # for float8); an onnxruntime that cannot must say why the numerical check was skipped.
    assert agreement["skipped"] or agreement["cosine"] > 0.98
    assert any("basic graph optimizations" in note for note in payload["notes"])
    assert runner.invoke(app, ["inspect", str(out), "--strict"]).exit_code == 0


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed: builds for real")
def test_int8_trt_without_tensorrt_is_exit_3_with_the_trtexec_line(mlp: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, data = mlp
    out = tmp_path / "m-int8.engine"
    result = runner.invoke(
        app,
        ["export", str(ckpt), "--trt", "--sparse", "--precision", "int8", "--calib", f"tensors:{data}", "-o", str(out)],
    )
    assert result.exit_code == 3, result.output
    assert "--int8" in result.stderr and "--sparsity=enable" in result.stderr and "--stronglyTyped" in result.stderr
    assert (tmp_path / "m-int8.onnx").exists()


def test_bench_runs_the_int8_onnx_dense_vs_sparse(mlp: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, data = mlp
    sparse, dense = tmp_path / "sparse-int8.onnx", tmp_path / "dense-int8.onnx"
    assert _export(str(ckpt), "--precision", "int8", "--calib", f"tensors:{data}", "-o", str(sparse))[0] == 0
    code, _, _ = _dense_int8(data, dense)
    assert code == 0
    result = runner.invoke(
        app, ["bench", str(sparse), "--vs", str(dense), "--backend", "onnxruntime", "--batch-size", "1",
              "--iters", "5", "--warmup", "1", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["precision"] == "int8 (Q/DQ)"
    assert [v["variant"] for v in payload["variants"]] == ["sparse", "dense"]
    assert all(r["latency_ms"]["count"] == 5 for r in payload["results"])

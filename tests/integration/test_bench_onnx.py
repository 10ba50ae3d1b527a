"""``nmcli bench`` on the onnxruntime path: a pruned and a dense ONNX file, end to end on the CPU.

Every CPU run says ``--device cpu`` (in FAST): with onnxruntime-gpu the default device is cuda.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fixtures.models import tiny_mlp
from nmcli.bench.onnxruntime_backend import OnnxVariant, is_sparse_onnx, session_spec
from nmcli.cli.app import app
from nmcli.commands.prune import run_prune
from nmcli.inputs import example_inputs
from nmcli.models.sources import load_model
from tests.conftest import py_source

runner = CliRunner()
FAST = ("--iters", "3", "--warmup", "1", "--device", "cpu")


def _export(model: torch.nn.Module, path: Path, dynamic: bool = True) -> Path:
    torch.onnx.export(
        model.eval(),
        (torch.randn(1, 64),),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}} if dynamic else None,
        dynamo=False,
    )
    return path


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bench-onnx")
    ckpt = folder / "mlp-2of4.safetensors"
    run_prune(py_source("tiny_mlp"), input_shape="1x64", output=ckpt)
    sparse_model = load_model(str(ckpt)).model
    return {
        "sparse": _export(sparse_model, folder / "sparse.onnx"),
        "dense": _export(tiny_mlp(), folder / "dense.onnx"),
        "fixed": _export(tiny_mlp(), folder / "fixed.onnx", dynamic=False),
        "ckpt": ckpt,
    }


def test_sparse_vs_dense_onnx(onnx_files: dict[str, Path]) -> None:
    result = runner.invoke(
        app,
        ["bench", str(onnx_files["sparse"]), "--vs", str(onnx_files["dense"]), "--batch-size", "1,4", "--json", *FAST],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["backend"] == "onnxruntime" and data["device"] == "cpu"
    assert [(r["variant"], r["batch_size"]) for r in data["results"]] == [
        ("sparse", 1),
        ("sparse", 4),
        ("dense", 1),
        ("dense", 4),
    ]
    for row in data["results"]:
        assert {"p50", "p90", "p99", "mean"} <= set(row["latency_ms"]) and row["throughput"] > 0
        assert row["sparse_kernel"] is False
    for s in data["speedup"]:
        assert isinstance(s["sparse_over_dense"], float) and s["outputs_max_abs_diff"] > 0
    assert any("onnxruntime's CPU and CUDA execution providers" in n for n in data["notes"])
    assert data["variants"][0]["providers"] == ["CPUExecutionProvider"]
    assert data["environment"]["onnxruntime"]


def test_same_kind_files_are_target_and_vs(onnx_files: dict[str, Path]) -> None:
    result = runner.invoke(app, ["bench", str(onnx_files["dense"]), "--vs", str(onnx_files["fixed"]), "--json", *FAST])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["variant"] for r in data["results"]] == ["target", "vs"]
    assert data["speedup"][0]["sparse_over_dense"] is None and data["speedup"][0]["target_over_vs"] > 0
    assert data["speedup"][0]["outputs_max_abs_diff"] == pytest.approx(0.0, abs=1e-5)  # the same weights


def test_onnx_outputs_match_the_torch_model(onnx_files: dict[str, Path]) -> None:
    assert is_sparse_onnx(onnx_files["sparse"]) and not is_sparse_onnx(onnx_files["dense"])
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_files["sparse"]), providers=["CPUExecutionProvider"])
    spec, sizes = session_spec(session.get_inputs(), None, [4])
    variant = OnnxVariant("sparse", onnx_files["sparse"], device="cpu", spec=spec, sparse=True, vocab=100)
    variant.open(sizes)
    try:
        got = variant.outputs(4)
    finally:
        variant.close()
    _, kwargs = example_inputs(spec, batch_size=4)
    with torch.no_grad():
        want = load_model(str(onnx_files["ckpt"])).model(kwargs["x"])
    assert torch.allclose(got[0], want, atol=1e-5)


def test_fixed_batch_and_missing_cuda_provider(onnx_files: dict[str, Path]) -> None:
    fixed = runner.invoke(app, ["bench", str(onnx_files["fixed"]), "--batch-size", "2", *FAST])
    assert fixed.exit_code == 2 and "--dynamic-batch" in fixed.stderr
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime has a CUDA provider here")
    cuda = runner.invoke(app, ["bench", str(onnx_files["dense"]), "--iters", "3", "--device", "cuda"])
    assert cuda.exit_code == 3 and "CUDAExecutionProvider" in cuda.stderr

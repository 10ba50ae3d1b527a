"""Export real models (CNN, MLP, MiniLM, tiny GPT-2), run them in onnxruntime against torch, and
check independently that every pruned weight is an N:M initializer along its ONNX-layout axis."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from nmcli.commands.export import ExportResult, run_export
from nmcli.commands.prune import run_prune
from nmcli.formats.onnx_layout import find_weights, initializer_tensor, load_onnx, weight_compliance
from nmcli.formats.open import load_checkpoint
from nmcli.nm.pattern import Pattern
from tests.conftest import py_source


def _check(result: ExportResult, ckpt: Path, dynamic: bool) -> None:
    layers = load_checkpoint(ckpt).meta.layers
    assert result.lost_layers == [] and result.warnings == []
    assert {m.param for m in result.matches} == {e.param for e in layers}
    assert result.verified is True and result.verify is not None
    assert len(result.verify.runs) == (2 if dynamic else 1)
    assert result.verify.max_abs_diff is not None and result.verify.max_abs_diff < 1e-3
    # Independent of the value matching: the graph holds one 2:4 weight initializer per pruned layer.
    model = load_onnx(result.paths.onnx)
    onnx.checker.check_model(model)
    compliant = {
        w.name
        for w in find_weights(model)
        if weight_compliance(initializer_tensor(model, w.name), Pattern(2, 4), w.axis)[1]
    }
    assert {m.initializer for m in result.matches} <= compliant
    assert len(compliant) >= len(layers)
    if dynamic:
        dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
        assert all(d[0] == "batch" for d in dims)


@pytest.mark.parametrize(("factory", "shape"), [("tiny_cnn", "2x3x16x16"), ("tiny_mlp", "4x64")])
def test_cnn_and_mlp(factory: str, shape: str, tmp_path: Path) -> None:
    ckpt = tmp_path / f"{factory}-2of4.safetensors"
    run_prune(py_source(factory), input_shape=shape, output=ckpt)
    result = run_export(str(ckpt), dynamic_batch=True)
    assert result.paths.onnx == tmp_path / f"{factory}-2of4.onnx"
    _check(result, ckpt, dynamic=True)
    if factory == "tiny_cnn":  # BatchNorm is folded into the conv before it: found by its zeros
        assert {m.how for m in result.matches} == {"zeros", "values"}


@pytest.fixture(scope="module")
def minilm_export(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ExportResult, Path]:
    folder = tmp_path_factory.mktemp("minilm")
    ckpt = folder / "minilm-2of4.safetensors"
    run_prune(f"hf:{minilm_dir}", input_shape="input_ids:1x32:int64,attention_mask:1x32:int64", output=ckpt)
    return run_export(str(ckpt), dynamic_batch=True), ckpt


def test_minilm_dynamic_batch_and_sequence(minilm_export: tuple[ExportResult, Path]) -> None:
    result, ckpt = minilm_export
    _check(result, ckpt, dynamic=True)
    assert len(result.matches) == 37  # 6 layers x (q, k, v, attention out, intermediate, output) + pooler
    assert result.onnx is not None and result.onnx.input_names == ["input_ids", "attention_mask"]
    assert result.onnx.output_names == ["last_hidden_state", "pooler_output"]
    assert result.onnx.dynamic_axes["input_ids"] == {0: "batch", 1: "sequence"}
    assert [r.spec for r in result.verify.runs][1] == "input_ids:3x16:int64,attention_mask:3x16:int64"  # type: ignore[union-attr]
    # Linear on 3-D activations exports as MatMul with W.T ([in, out], axis 0); the pooler's 2-D
    # Linear as Gemm with transB=1 (W as stored, axis 1).
    ops = {m.param: (m.op_type, m.axis) for m in result.matches}
    assert ops.pop("pooler.dense.weight") == ("Gemm", 1)
    assert set(ops.values()) == {("MatMul", 0)}


def test_tiny_gpt2_conv1d_weights(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "gpt2-2of4.safetensors"
    run_prune(f"hf:{tiny_gpt2_dir}", input_shape="input_ids:2x16:int64,attention_mask:2x16:int64", output=ckpt)
    result = run_export(str(ckpt), dynamic_batch=True)
    _check(result, ckpt, dynamic=True)
    assert len(result.matches) == 8 and result.onnx is not None and result.onnx.output_names == ["logits"]
    # transformers Conv1D stores [in, out] and runs addmm: Gemm without transB, reduction axis 0.
    assert {(m.op_type, m.axis, m.how) for m in result.matches} == {("Gemm", 0, "values")}


def test_tiny_gpt2_fp16_keeps_zeros_and_verifies(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "gpt2-2of4.safetensors"
    run_prune(f"hf:{tiny_gpt2_dir}", input_shape="input_ids:2x16:int64,attention_mask:2x16:int64", output=ckpt)
    result = run_export(str(ckpt), precision="fp16", output=tmp_path / "gpt2-fp16.onnx")
    assert result.lost_layers == [] and len(result.matches) == 8 and result.verified is True
    model = load_onnx(result.paths.onnx)
    for m in result.matches:
        assert m.initializer is not None
        values = initializer_tensor(model, m.initializer)
        assert values.dtype.itemsize == 2 and weight_compliance(values, Pattern(2, 4), m.axis)[1]

"""TensorRT builder configuration (pure), trtexec lines, the int8 decision, build-log and engine-inspector
parsing (against a realistic inspector JSON written from TensorRT's schema); real builds marked ``trt``."""

from __future__ import annotations

from pathlib import Path

import pytest

from nmcli.errors import InputError
from nmcli.export.tensorrt import (
    builder_settings,
    check_trt_precision,
    layer_status,
    parse_engine_information,
    parse_sparsity_log,
    trtexec_command,
)
from nmcli.inputs import parse_input_spec

INSPECTOR_JSON = Path(__file__).parent / "data" / "trt_engine_information.json"

TEXT = parse_input_spec("input_ids:2x16:int64,attention_mask:2x16:int64")
TEXT_AXES = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}


def _settings(major: int, precision: str, sparse: bool = True, **kw: object):  # type: ignore[no-untyped-def]
    return builder_settings(
        trt_major=major,
        precision=precision,
        sparse=sparse,
        spec=TEXT,
        input_names=["input_ids", "attention_mask"],
        dynamic_axes=TEXT_AXES,
        **kw,  # type: ignore[arg-type]
    )


def test_weakly_typed_generations_take_precision_from_flags() -> None:
    eight = _settings(8, "fp16")
    assert eight.network_flags == ("EXPLICIT_BATCH",) and eight.flags == ("FP16", "SPARSE_WEIGHTS")
    ten = _settings(10, "fp16", workspace_mb=512)
    assert ten.network_flags == () and ten.flags == ("FP16", "SPARSE_WEIGHTS")
    assert ten.workspace_bytes == 512 * 1024 * 1024 and ten.notes == ()
    assert _settings(10, "bf16").flags == ("BF16", "SPARSE_WEIGHTS")
    with pytest.raises(InputError, match="TensorRT 9"):
        _settings(8, "bf16")


def test_tensorrt_11_is_strongly_typed_with_only_sparse_weights() -> None:
    for precision in ("fp16", "bf16", "fp32"):
        s = _settings(11, precision)
        assert s.network_flags == ("STRONGLY_TYPED",) and s.flags == ("SPARSE_WEIGHTS",)


def test_int8_and_fp8_build_from_qdq_with_explicit_precision() -> None:
    # Issue 21: the Q/DQ ONNX carries the scales; TensorRT 8-10 get INT8 (+FP16 for float layers), 11+ is
    # strongly typed; never an INT8 calibrator.
    for major in (8, 9, 10):
        s = _settings(major, "int8")
        assert s.flags == ("INT8", "FP16", "SPARSE_WEIGHTS") and any("Q/DQ" in n for n in s.notes)
    assert _settings(10, "fp8").flags == ("FP8", "FP16", "SPARSE_WEIGHTS")
    with pytest.raises(InputError, match="TensorRT 9"):
        _settings(8, "fp8")
    strongly = _settings(11, "int8")
    assert strongly.network_flags == ("STRONGLY_TYPED",) and strongly.flags == ("SPARSE_WEIGHTS",)
    line = trtexec_command("m-int8.onnx", "m-int8.engine", _settings(10, "int8"))
    assert "--int8" in line and "--sparsity=enable" in line and "--fp16" in line
    for ok in ("fp32", "fp16", "bf16", "int8", "fp8"):
        check_trt_precision(ok)
    with pytest.raises(InputError, match="unknown precision"):
        check_trt_precision("int4")


def test_fp32_with_sparse_says_sparse_kernels_need_fp16_and_dense_has_no_flag() -> None:
    assert any("fp16" in n for n in _settings(10, "fp32").notes)
    dense = _settings(10, "fp32", sparse=False)
    assert dense.flags == () and dense.notes == () and dense.workspace_bytes is None


def test_profiles_cover_dynamic_batch_and_sequence() -> None:
    s = _settings(10, "fp16", max_batch=8, max_sequence=64)
    assert [(p.name, p.min, p.opt, p.max) for p in s.profiles] == [
        ("input_ids", (1, 1), (2, 16), (8, 64)),
        ("attention_mask", (1, 1), (2, 16), (8, 64)),
    ]
    image = builder_settings(
        trt_major=10,
        precision="fp16",
        sparse=True,
        spec=parse_input_spec("4x3x32x32"),
        input_names=["input"],
        dynamic_axes={"input": {0: "batch"}},
    )
    assert [(p.min, p.opt, p.max) for p in image.profiles] == [((1, 3, 32, 32), (4, 3, 32, 32), (32, 3, 32, 32))]
    static = builder_settings(
        trt_major=10,
        precision="fp16",
        sparse=True,
        spec=TEXT,
        input_names=["input_ids", "attention_mask"],
        dynamic_axes={},
    )
    assert static.profiles == ()


def test_trtexec_command_matches_the_settings() -> None:
    line = trtexec_command(
        Path("m.onnx"), Path("m.engine"), _settings(10, "fp16", workspace_mb=256, max_batch=8, max_sequence=64)
    )
    assert line.split() == [
        "trtexec",
        "--onnx=m.onnx",
        "--saveEngine=m.engine",
        "--sparsity=enable",
        "--fp16",
        "--memPoolSize=workspace:256",
        "--minShapes=input_ids:1x1,attention_mask:1x1",
        "--optShapes=input_ids:2x16,attention_mask:2x16",
        "--maxShapes=input_ids:8x64,attention_mask:8x64",
    ]
    strongly = trtexec_command("m.onnx", "m.engine", _settings(11, "fp16"))
    assert "--stronglyTyped" in strongly and "--fp16" not in strongly


def test_sparsity_log_lines_are_parsed_and_matched_to_pruned_nodes() -> None:
    log = [
        "[TRT] (Sparsity) Layers eligible for sparse math: MatMul_401, Conv_619 + Relu_620, Conv_622",
        "[TRT] some other line",
        "[TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: Conv_619 + Relu_620",
    ]
    eligible, picked = parse_sparsity_log(log)
    assert eligible == ["MatMul_401", "Conv_619 + Relu_620", "Conv_622"] and picked == ["Conv_619 + Relu_620"]
    rows = layer_status({"a.weight": "Conv_619", "b.weight": "MatMul_401", "c.weight": "Gemm_9"}, eligible, picked)
    assert [(r["param"], r["eligible"], r["sparse_kernel"]) for r in rows] == [
        ("a.weight", True, True),
        ("b.weight", True, False),
        ("c.weight", False, False),
    ]
    assert rows[0]["evidence"].startswith("build log: picked") and "dense kernel was faster" in rows[1]["evidence"]


def test_engine_inspector_json_is_parsed() -> None:
    layers = {layer.name: layer for layer in parse_engine_information(INSPECTOR_JSON.read_text())}
    assert len(layers) == 7
    stem = layers["/stem/conv/Conv + /stem/act/Relu"]
    assert stem.layer_type == "CaskConvolution" and stem.has_sparse_weights is True and not stem.myelin
    assert stem.onnx_nodes == ("/stem/conv/Conv", "/stem/act/Relu")  # from Metadata, split at \x1e
    assert stem.tactic_value == "0x4d2d2a4a4ba2fa4e" and "sparse" in (stem.tactic_name or "")
    fc1 = layers["/head/fc1/MatMul + /head/fc1/Add + /head/act/Relu"]
    assert fc1.has_sparse_weights is False and "/head/fc1/MatMul" in fc1.onnx_nodes
    fc2 = layers["/head/fc2/Gemm"]  # no Metadata (TensorRT < 8.6): the name's parts
    assert fc2.onnx_nodes == ("/head/fc2/Gemm",) and fc2.has_sparse_weights is True
    reformat = next(layer for layer in layers.values() if layer.layer_type == "Reformat")
    assert reformat.has_sparse_weights is None and reformat.tactic_value == "0x00000000000003e8"
    foreign = [layer for layer in layers.values() if layer.layer_type == "Myelin"]
    assert len(foreign) == 2 and all(layer.myelin and layer.has_sparse_weights is None for layer in foreign)
    assert foreign[0].foreign_range == (
        "/encoder/layer.0/attention/self/query/MatMul",
        "/encoder/layer.0/output/LayerNorm/Add_1",
    )
    assert "/encoder/layer.0/output/dense/MatMul" in foreign[0].onnx_nodes and foreign[1].onnx_nodes == ()
    myelin_gemm = layers["/classifier/Gemm_myl9_4"]  # TensorRT 10 shows Myelin's own ops
    assert myelin_gemm.myelin and myelin_gemm.layer_type == "gemm" and myelin_gemm.onnx_nodes == ("/classifier/Gemm",)


def test_inspector_decides_and_myelin_fused_layers_are_reported_not_missing() -> None:
    layers = parse_engine_information(INSPECTOR_JSON.read_text())
    nodes = {
        "stem.conv.weight": "/stem/conv/Conv",
        "head.fc1.weight": "/head/fc1/MatMul",
        "head.fc2.weight": "/head/fc2/Gemm",
        "encoder.layer.0.attention.self.query.weight": "/encoder/layer.0/attention/self/query/MatMul",
        "encoder.layer.1.attention.self.key.weight": "/encoder/layer.1/attention/self/key/MatMul",
        "classifier.weight": "/classifier/Gemm",
    }
    # the log says fc1 picked a sparse kernel; the inspector (HasSparseWeights: 0) wins
    eligible = ["/stem/conv/Conv + /stem/act/Relu", "/head/fc1/MatMul + /head/fc1/Add + /head/act/Relu"]
    rows = {r["param"]: r for r in layer_status(nodes, eligible, [eligible[1]], layers)}
    assert [rows[p]["sparse_kernel"] for p in nodes] == [True, False, True, None, None, None]
    assert rows["stem.conv.weight"]["evidence"].startswith("engine inspector: HasSparseWeights=1")
    assert rows["stem.conv.weight"]["eligible"] is True
    assert rows["head.fc1.weight"]["evidence"].startswith("engine inspector: HasSparseWeights=0")
    assert rows["head.fc2.weight"]["engine_layer"] == "/head/fc2/Gemm"
    query = rows["encoder.layer.0.attention.self.query.weight"]
    assert (
        query["engine_layer"].startswith("{ForeignNode[/encoder/layer.0/") and "not attributable" in query["evidence"]
    )
    key = rows["encoder.layer.1.attention.self.key.weight"]  # in no layer's Metadata: a Myelin region holds it
    assert "fused into a Myelin layer" in key["evidence"]
    assert rows["classifier.weight"]["engine_layer"] == "/classifier/Gemm_myl9_4"


def test_layer_names_only_and_bad_inspector_json() -> None:
    names_only = parse_engine_information({"Layers": ["/fc/Gemm + /act/Relu", "{ForeignNode[/a/MatMul.../b/Add]}"]})
    assert names_only[0].onnx_nodes == ("/act/Relu", "/fc/Gemm") and names_only[0].has_sparse_weights is None
    assert names_only[1].myelin and names_only[1].onnx_nodes == ()
    rows = layer_status({"fc.weight": "/fc/Gemm"}, [], [], names_only)
    assert rows[0]["sparse_kernel"] is False  # in a plain layer, and not in the (Sparsity) log: dense
    for bad in ("[]", '{"Bindings": []}', '{"Layers": 3}'):
        with pytest.raises(ValueError, match="engine-inspector"):
            parse_engine_information(bad)


@pytest.mark.trt
@pytest.mark.gpu
def test_real_tensorrt_builds_a_sparse_engine(tmp_path: Path) -> None:
    from nmcli.commands.export import run_export
    from nmcli.commands.prune import run_prune
    from tests.conftest import py_source

    ckpt = tmp_path / "mlp.safetensors"
    run_prune(py_source("tiny_mlp"), input_shape="8x64", output=ckpt)
    result = run_export(str(ckpt), trt=True, sparse=True, precision="fp16", dynamic_batch=True, workspace_mb=256)
    assert result.engine is not None and result.engine.path.stat().st_size > 0
    assert "SPARSE_WEIGHTS" in result.engine.settings.flags
    assert {row["param"] for row in result.engine.layers} == {m.param for m in result.matches}
    assert all(row["evidence"] and row["sparse_kernel"] in (True, False, None) for row in result.engine.layers)
    assert result.engine.inspector, "ProfilingVerbosity.DETAILED gives the inspector's layers"
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(result.engine.path.read_bytes())
    assert engine is not None and engine.num_io_tensors == 2

"""TensorRT builder configuration (pure), trtexec lines and sparsity-log parsing; real builds marked ``trt``."""

from __future__ import annotations

from pathlib import Path

import pytest

from nmcli.errors import InputError
from nmcli.export.tensorrt import builder_settings, layer_status, parse_sparsity_log, trtexec_command
from nmcli.inputs import parse_input_spec

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
    ten = _settings(10, "int8", workspace_mb=512)
    assert ten.network_flags == () and ten.flags == ("INT8", "FP16", "SPARSE_WEIGHTS")
    assert ten.workspace_bytes == 512 * 1024 * 1024 and any("calibration" in n for n in ten.notes)
    assert _settings(10, "bf16").flags == ("BF16", "SPARSE_WEIGHTS")
    with pytest.raises(InputError, match="TensorRT 9"):
        _settings(8, "bf16")


def test_tensorrt_11_is_strongly_typed_with_only_sparse_weights() -> None:
    for precision in ("fp16", "bf16", "fp32"):
        s = _settings(11, precision)
        assert s.network_flags == ("STRONGLY_TYPED",) and s.flags == ("SPARSE_WEIGHTS",)
    with pytest.raises(InputError, match="Q/DQ"):
        _settings(11, "int8")


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


@pytest.mark.trt
@pytest.mark.gpu
def test_real_tensorrt_builds_a_sparse_engine(tmp_path: Path) -> None:
    from nmcli.export import run_export
    from nmcli.prune import run_prune
    from tests.conftest import py_source

    ckpt = tmp_path / "mlp.safetensors"
    run_prune(py_source("tiny_mlp"), input_shape="8x64", output=ckpt)
    result = run_export(str(ckpt), trt=True, sparse=True, precision="fp16", dynamic_batch=True, workspace_mb=256)
    assert result.engine is not None and result.engine.path.stat().st_size > 0
    assert "SPARSE_WEIGHTS" in result.engine.settings.flags
    assert {row["param"] for row in result.engine.layers} == {m.param for m in result.matches}
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(result.engine.path.read_bytes())
    assert engine is not None and engine.num_io_tensors == 2

"""bench's option parsing, backend choice, output comparison, input specs and 2:4 kernel eligibility."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nmcli.bench import onnxruntime_backend, tensorrt_backend, torch_backend
from nmcli.bench.run import detect_backend, flatten_outputs, max_abs_diff, parse_batch_sizes, spec_from_signature
from nmcli.bench.torch_backend import semi_structured_support, swap_plan
from nmcli.errors import InputError
from nmcli.patterns import TENSOR_CORE_PATTERN, nm_mask


def test_parse_batch_sizes() -> None:
    assert parse_batch_sizes("1,8,32") == [1, 8, 32]
    assert parse_batch_sizes(" 4, 4 ,2") == [4, 2]
    assert parse_batch_sizes(None) is None
    assert parse_batch_sizes([2, 3]) == [2, 3]
    for bad in ("0", "1,x", "", "-1", "1.5"):
        with pytest.raises(InputError):
            parse_batch_sizes(bad)


def test_detect_backend_by_suffix_and_checks_explicit_choice() -> None:
    assert detect_backend("m.safetensors", None) == "torch"
    assert detect_backend("py:pkg.mod:build", None) == "torch"
    assert detect_backend("m.onnx", None) == "onnxruntime"
    assert detect_backend("m.engine", None) == "tensorrt"
    assert detect_backend("m.plan", "tensorrt") == "tensorrt"
    with pytest.raises(InputError, match="not one"):
        detect_backend("m.safetensors", "onnxruntime")
    with pytest.raises(InputError, match="unknown --backend"):
        detect_backend("m.onnx", "tvm")


def test_flatten_outputs_and_max_abs_diff() -> None:
    a = torch.tensor([1.0, 2.0])
    out = {"logits": a, "hidden": (a * 2, torch.tensor([1, 2]))}  # the int tensor is skipped
    flat = flatten_outputs(out)
    assert [t.tolist() for t in flat] == [[1.0, 2.0], [2.0, 4.0]]
    other = [torch.tensor([1.0, 2.5]), torch.tensor([2.0, 3.0])]
    assert max_abs_diff(flat, other) == pytest.approx(1.0)
    assert max_abs_diff(flat, flat[:1]) is None
    assert max_abs_diff([a], [torch.tensor([1.0, float("nan")])]) == float("inf")


def test_spec_from_signature() -> None:
    sig = [("input_ids", [None, 16], torch.int64), ("attention_mask", [None, 16], torch.int64)]
    spec, sizes = spec_from_signature(sig, None, [1, 4])
    assert str(spec) == "input_ids:1x16:int64,attention_mask:1x16:int64" and sizes == [1, 4]
    spec, sizes = spec_from_signature([("x", [2, 8], torch.float32)], None, None)
    assert str(spec) == "x:2x8:float32" and sizes == [2]
    with pytest.raises(InputError, match="fixed at 2"):
        spec_from_signature([("x", [2, 8], torch.float32)], None, [1])
    with pytest.raises(InputError, match="dynamic dimensions"):
        spec_from_signature([("x", [None, None], torch.float32)], None, None)
    spec, _ = spec_from_signature([("x", [None, None], torch.float32)], "3x5", None)
    assert str(spec) == "x:3x5:float32"
    with pytest.raises(InputError, match="does not name"):
        spec_from_signature(sig, "1x16", None)


def test_backend_modules_report_availability() -> None:
    assert torch_backend.is_available() is True
    assert onnxruntime_backend.is_available() is True  # a core dependency
    assert isinstance(tensorrt_backend.is_available(), bool)


def test_cpu_and_fp32_give_the_reason_no_sparse_kernel_runs() -> None:
    reason = semi_structured_support("cpu", torch.float16)
    assert reason is not None and "compute capability >= 8.0" in reason


def _pruned_linear(rows: int, cols: int, dtype: torch.dtype = torch.float16) -> nn.Linear:
    layer = nn.Linear(cols, rows).to(dtype)
    with torch.no_grad():
        layer.weight.mul_(nm_mask(layer.weight, TENSOR_CORE_PATTERN, axis=1))
    return layer


def test_swap_plan_eligibility_reasons() -> None:
    model = nn.Sequential(
        _pruned_linear(64, 128),  # eligible for both cuSPARSELt (16x16) and CUTLASS (32x64)
        nn.Linear(64, 64).half(),  # dense weight
        _pruned_linear(8, 64),  # too few rows for either kernel
        _pruned_linear(64, 128, torch.float32),  # fp32
    )
    eligible, skipped = swap_plan(model)
    assert eligible == ["0"]
    assert "not 2:4" in skipped["1"]
    assert "multiples of" in skipped["2"]
    assert "fp16/bf16" in skipped["3"]


def test_swap_plan_leaves_multihead_attention_alone() -> None:
    model = nn.MultiheadAttention(64, 4).half()
    with torch.no_grad():
        w = model.out_proj.weight
        w.mul_(nm_mask(w, TENSOR_CORE_PATTERN, axis=1))
    eligible, skipped = swap_plan(model)
    assert eligible == [] and "MultiheadAttention" in skipped["out_proj"]

"""bench's option parsing, backend table, output comparison, input specs and 2:4 kernel eligibility."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nmcli.bench import onnxruntime_backend, tensorrt_backend, torch_backend
from nmcli.bench.sparse_kernels import semi_structured_support, swap_plan
from nmcli.bench.types import flatten_outputs, max_abs_diff, spec_from_signature
from nmcli.commands.bench import BACKENDS, REGISTRY, backend_module, detect_backend, make_plan, parse_batch_sizes
from nmcli.errors import InputError
from nmcli.nm.masks import nm_mask
from nmcli.nm.pattern import TENSOR_CORE_PATTERN


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
    with pytest.raises(InputError, match="a TensorRT engine"):
        detect_backend("m.onnx", "tensorrt")


def test_one_backend_table_names_every_backend_module() -> None:
    assert BACKENDS == ("torch", "onnxruntime", "tensorrt")
    modules = {b.name: backend_module(b.name) for b in REGISTRY}
    assert modules == {"torch": torch_backend, "onnxruntime": onnxruntime_backend, "tensorrt": tensorrt_backend}
    assert all(callable(m.plan) and callable(m.is_available) for m in modules.values())
    assert [b.name for b in REGISTRY if b.compile] == ["torch"]


def test_backends_do_not_import_run() -> None:
    """The circle is gone: the shared types sit below run and the backends, which never import run."""
    import ast
    from pathlib import Path

    import nmcli.bench as pkg

    folder = Path(pkg.__file__).parent
    for name in (
        "types",
        "device",
        "timing",
        "sparse_kernels",
        "torch_backend",
        "onnxruntime_backend",
        "tensorrt_backend",
    ):
        tree = ast.parse((folder / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "nmcli.commands.bench" not in imported, name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "tpu"}, "unknown --device"),
        ({"device": "cuda:x"}, "unknown --device"),
        ({"precision": "int4"}, "--precision"),
        ({"vs": "b.safetensors"}, "--vs"),
        ({"compile": True, "target": "m.onnx"}, "--compile applies to the torch backend only"),
        ({"vs": "b.engine", "target": "m.onnx"}, "not the same kind"),
    ],
)
def test_make_plan_rejects_bad_options_before_loading(kwargs: dict[str, object], message: str) -> None:
    target = str(kwargs.pop("target", "missing.safetensors"))
    with pytest.raises(InputError, match=message):
        make_plan(target, **kwargs)  # type: ignore[arg-type]


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


def test_swap_falls_back_per_layer_and_keeps_dense_weights_where_kernels_fail() -> None:
    """On the CPU every 2:4 kernel fails (torch: CUDA tensors only): each layer is listed, none lost."""
    from nmcli.bench.sparse_kernels import to_semi_structured

    model = nn.Sequential(_pruned_linear(64, 128), nn.ReLU(), _pruned_linear(32, 64), nn.Linear(32, 4).half())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = to_semi_structured(model, backends=["cusparselt", "cutlass"], probe_rows={"0": 5})
    assert report.swapped == [] and report.backend is None
    assert set(report.failed) == {"0", "2"} and "not 2:4" in report.skipped["3"]
    assert all("cuSPARSELt" in why and "CUTLASS" in why for why in report.failed.values())
    assert set(report.dense_layers) == {"0", "2", "3"}
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model(torch.randn(3, 128).half()).shape == (3, 4)

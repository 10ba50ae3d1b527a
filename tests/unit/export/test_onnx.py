"""ONNX export internals: output paths, lost-layer detection, external data, both exporters."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nmcli.commands.export import export_paths, run_export, second_spec
from nmcli.commands.prune import run_prune
from nmcli.errors import InputError
from nmcli.export.onnx import cast_model, export_onnx
from nmcli.export.verify import verify_onnx
from nmcli.formats.onnx_layout import find_weights, initializer_tensor, load_onnx, locate_weights, weight_compliance
from nmcli.inputs import parse_input_spec
from nmcli.nm.pattern import Pattern
from tests.conftest import py_source

THIS = Path(__file__).resolve()


class MergedAdapter(nn.Module):
    """``fc`` runs with a dense adapter merged into its weight at run time: exporters fold
    ``weight + delta`` into one dense constant, so the pruned weight never reaches the graph."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(32, 16)
        self.head = nn.Linear(16, 8)
        self.register_buffer("delta", torch.randn(16, 32) * 1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(F.linear(x, self.fc.weight + self.delta, self.fc.bias)))


def merged_adapter() -> nn.Module:
    return MergedAdapter()


def test_export_paths_follow_o_and_defaults() -> None:
    d = export_paths("m/x-2of4.safetensors", onnx=False, trt=False, compress=False, output=None)
    assert (d.onnx, d.engine, d.compressed) == (Path("m/x-2of4.onnx"), None, None)
    t = export_paths("m/x.safetensors", onnx=False, trt=True, compress=True, output="out/y.engine")
    assert (t.onnx, t.engine, t.compressed) == (
        Path("out/y.onnx"),
        Path("out/y.engine"),
        Path("m/x-compressed.safetensors"),
    )
    c = export_paths("x.safetensors", onnx=False, trt=False, compress=True, output="z.safetensors")
    assert (c.onnx, c.compressed) == (None, Path("z.safetensors"))
    with pytest.raises(InputError, match=r"\.onnx"):
        export_paths("x.safetensors", onnx=True, trt=False, compress=False, output="y.engine")


def test_second_spec_changes_batch_and_text_sequence() -> None:
    assert str(second_spec(parse_input_spec("2x3x8x8"))) == "4x3x8x8"
    text = second_spec(parse_input_spec("input_ids:1x32:int64,attention_mask:1x32:int64"))
    assert [t.shape for t in text.tensors] == [(3, 16), (3, 16)]


def test_a_folded_layer_is_reported_lost_by_name(tmp_path: Path) -> None:
    ckpt = tmp_path / "adapter-2of4.safetensors"
    run_prune(f"py:{THIS}:merged_adapter", input_shape="2x32", output=ckpt)
    result = run_export(str(ckpt), trust=True)  # the source is this test file: the user names it
    assert result.lost_layers == ["fc.weight"]
    assert [m.param for m in result.matches if not m.lost] == ["head.weight"]
    assert result.verified is True
    assert any("fc.weight" in w and "1 of 2" in w for w in result.warnings)
    # The folded constant really is dense: no Gemm/MatMul weight of the graph is 2:4 with 16x32 elements.
    model = load_onnx(result.paths.onnx)
    shapes = {
        w.name: weight_compliance(initializer_tensor(model, w.name), Pattern(2, 4), w.axis)[1]
        for w in find_weights(model)
        if initializer_tensor(model, w.name).numel() == 16 * 32
    }
    assert shapes and not any(shapes.values())


def test_scaled_weights_are_found_by_their_zero_pattern() -> None:
    torch.manual_seed(0)
    weight = torch.randn(8, 16)
    weight[:, ::2] = 0.0
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])],
            [onnx.numpy_helper.from_array((weight.t() * 3.0).numpy(), "w")],
        )
    )
    (match,) = locate_weights(model, {"fc.weight": (weight, Pattern(2, 4))})
    assert (match.initializer, match.op_type, match.axis, match.how, match.lost) == ("w", "MatMul", 0, "zeros", False)
    (exact,) = locate_weights(model, {"fc.weight": (weight * 3.0, Pattern(2, 4))})
    assert exact.how == "transposed" and exact.compliant


def test_external_data_and_the_dynamo_exporter(tmp_path: Path) -> None:
    ckpt = tmp_path / "mlp.safetensors"
    run_prune(py_source("tiny_mlp"), input_shape="4x64", output=ckpt)
    from nmcli.models.sources import load_model

    loaded = load_model(str(ckpt))
    spec = parse_input_spec("4x64")
    ext = export_onnx(loaded.model, spec, tmp_path / "ext.onnx", external_data_threshold=0, dynamic_batch=True)
    assert ext.data_path == tmp_path / "ext.onnx.data" and ext.data_path.stat().st_size > 64 * 128 * 4
    assert (tmp_path / "ext.onnx").stat().st_size < 64 * 128 * 4
    weights = {e.param: (loaded.checkpoint.tensors[e.param], e.pattern) for e in loaded.checkpoint.meta.layers}  # type: ignore[union-attr]
    assert not any(m.lost for m in locate_weights(load_onnx(ext.path), weights))
    checked = verify_onnx(ext.path, loaded.model, [spec, second_spec(spec)], atol=1e-5, rtol=1e-4)
    assert checked.passed and len(checked.runs) == 2
    dyn = export_onnx(loaded.model, spec, tmp_path / "dyn.onnx", exporter="dynamo", opset=17)
    assert dyn.exporter == "dynamo" and dyn.opset == 18 and any("opset" in n for n in dyn.notes)
    assert not any(m.lost for m in locate_weights(load_onnx(dyn.path), weights))
    assert verify_onnx(dyn.path, loaded.model, [spec], atol=1e-5, rtol=1e-4).passed


def test_cast_model_keeps_pruned_zeros_positive() -> None:
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1e-30, -1e-30, 0.0, 1.0], [-0.0, 2.0, 0.0, 0.0]]))
    half = cast_model(model, torch.float16)
    assert half.weight.dtype == torch.float16 and not torch.signbit(half.weight[half.weight == 0]).any()
    assert model.weight.dtype == torch.float32  # the original is untouched

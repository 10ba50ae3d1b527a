"""Q/DQ placement plan, weights behind DequantizeLinear (int8 and float8), and the agreement check (issue 21)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nmcli.export.quantize import QuantCheck, compare_outputs, quantization_plan
from nmcli.formats.onnx_layout import find_weights, initializer_tensor, weight_compliance
from nmcli.nm.pattern import parse_pattern


def _residual_graph() -> onnx.ModelProto:
    """x -> Conv(w) -> +bias -> Add(x) [residual] -> Conv(w) -> MatMul(a, a) [activation x activation];
    and the residual sum also goes to an Add with the output (a join feeding no weighted op)."""
    w = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")
    w2 = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w2")
    bias = numpy_helper.from_array(np.ones((1, 4, 1, 1), np.float32), "bias")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Add", ["c", "bias"], ["cb"], name="bias_add"),
        helper.make_node("Add", ["cb", "x"], ["r"], name="residual"),
        helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["c2", "r"], ["s"], name="tail"),
        helper.make_node("MatMul", ["s", "s"], ["y"], name="scores"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        [w, w2, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_plan_quantizes_weighted_ops_and_residual_joins_only() -> None:
    quantize, exclude = quantization_plan(_residual_graph())
    assert quantize == ["conv", "residual", "conv2"]
    # bias Add, a join whose sum feeds no weighted op (a transformer's Add before LayerNorm) and an
    # activation-by-activation MatMul stay float
    assert exclude == ["bias_add", "tail", "scores"]


def _dq_model(data_type: int, values: np.ndarray) -> onnx.ModelProto:
    weight = helper.make_tensor("wq", data_type, list(values.shape), values.ravel().tolist())
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "s"], ["w"], name="dq"),
        helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [weight, scale],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_weights_behind_dequantize_linear_are_checked_for_n_m() -> None:
    two_four = np.array([[3, 0, -5, 0, 0, 7, 0, 1], [0, 2, 0, -1, 4, 0, 0, 9]], np.int8)
    dense = np.array([[3, 1, -5, 2, 1, 7, 2, 1], [1, 2, 1, -1, 4, 1, 1, 9]], np.int8)
    pattern = parse_pattern("2:4")
    for data_type in (TensorProto.INT8, TensorProto.FLOAT8E4M3FN):
        for values, expected in ((two_four, True), (dense, False)):
            model = _dq_model(data_type, values.astype(np.float32) if data_type != TensorProto.INT8 else values)
            (weight,) = find_weights(model)
            assert (weight.name, weight.op_type, weight.axis, weight.through) == (
                "wq",
                "Gemm",
                1,
                ("DequantizeLinear",),
            )
            tensor = initializer_tensor(model, "wq")
            assert tensor.shape == (2, 8)
            assert weight_compliance(tensor, pattern, weight.axis)[1] is expected


def test_compare_outputs_reports_agreement_or_why_it_was_skipped() -> None:
    model = _dq_model(TensorProto.INT8, np.arange(16, dtype=np.int8).reshape(2, 8)).SerializeToString()
    assert compare_outputs(model, model, []).skipped
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 8)).astype(np.float32)} for i in range(6)]
    check = compare_outputs(model, model, feeds)
    assert check.examples == 6 and check.cosine is not None and abs(check.cosine - 1) < 1e-6
    assert check.top1 == 1.0
    assert "cosine" in check.summary() and QuantCheck(skipped="x").summary().startswith("numerical check skipped")


def _masked_attention_graph() -> onnx.ModelProto:
    """x -> MatMul(w) -> +bias -> scores; scores + (1 - mask) * finfo.min -> Softmax: a BERT-like mask path."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.ones(8, np.float32), "bias")
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    lowest = numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "lowest")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
        helper.make_node("Add", ["h", "bias"], ["hb"], name="bias_add"),
        helper.make_node("Sub", ["one", "mask"], ["inv"], name="invert"),
        helper.make_node("Mul", ["inv", "lowest"], ["ext"], name="extend"),
        helper.make_node("Add", ["hb", "ext"], ["masked"], name="mask_add"),
        helper.make_node("Softmax", ["masked"], ["y"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["b", 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
        [w, bias, one, lowest],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _masked_feeds(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    mask = np.ones((1, 8), np.float32)
    mask[0, 6:] = 0.0  # padding: the extended mask holds finfo.min there
    return [{"x": rng.standard_normal((1, 8)).astype(np.float32), "mask": mask} for _ in range(n)]


def test_only_the_quantized_inputs_are_calibrated_so_histograms_survive_a_mask_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nmcli.export.quantize import calibrate_ranges, quantize_onnx, quantized_inputs

    model = _masked_attention_graph()
    path = tmp_path / "float.onnx"
    onnx.save_model(model, str(path))
    quantize, _ = quantization_plan(model)
    assert quantize == ["proj"] and quantized_inputs(model, quantize) == {"x"}
    for method in ("max", "percentile", "entropy"):
        ranges = calibrate_ranges(path, {"x"}, _masked_feeds(8), method=method, precision="int8")
        assert set(ranges.keys()) == {"x"}
        result = quantize_onnx(
            path, tmp_path / f"{method}.onnx", _masked_feeds(16), _masked_feeds(4), precision="int8", method=method
        )
        qdq = onnx.load(str(tmp_path / f"{method}.onnx"))
        quantized = [n.input[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
        # the GEMM's input only: no Q/DQ on its raw output (before the bias), none on the mask path
        assert quantized and all(name.startswith("x") for name in quantized), quantized
        assert result.check.cosine is not None and result.check.cosine > 0.99

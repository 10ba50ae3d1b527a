"""SmoothQuant-style scaling before the INT8 export: exact in float, zeros kept, chosen by measurement (issue 21)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from nmcli.export.smooth import smooth_model, smoothing_groups


def _two_four(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A [in, out] weight whose every group of 4 along the input axis keeps 2."""
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    for start in range(0, shape[0], 4):
        w[start + 2 : start + 4] = 0.0
    return w


def _shared_input_graph(share_weight: bool = False) -> onnx.ModelProto:
    """x -> MatMul(w1) and MatMul(w2) (a Q/K/V-like shared input); x also feeds a Relu that must stay unscaled."""
    w1 = numpy_helper.from_array(_two_four((16, 8), 1), "w1")
    w2 = numpy_helper.from_array(_two_four((16, 8), 2), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["y1"], name="mm1"),
        helper.make_node("MatMul", ["x", "w2"], ["y2"], name="mm2"),
        helper.make_node("Relu", ["x"], ["z"], name="relu"),
    ]
    if share_weight:
        nodes.append(helper.make_node("MatMul", ["z", "w1"], ["y3"], name="mm3"))
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y1", "y2", "z")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 16])], outputs, [w1, w2]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(n: int = 12) -> list[dict[str, np.ndarray]]:
    feeds = []
    for i in range(n):
        x = np.random.default_rng(10 + i).standard_normal((1, 6, 16)).astype(np.float32)
        x[..., 5] *= 60.0  # one outlier channel, as a transformer's LayerNorm/GELU outputs have
        feeds.append({"x": x})
    return feeds


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def test_smoothing_is_exact_in_float_keeps_zeros_and_leaves_other_readers_alone() -> None:
    model = _shared_input_graph()
    before = onnx.ModelProto()
    before.CopyFrom(model)
    records = smooth_model(model, ["mm1", "mm2"], _feeds())
    assert [(r.tensor, r.nodes) for r in records] == [("x", ("mm1", "mm2"))]
    (record,) = records
    # an outlier channel makes per-tensor int8 lose the ordinary channels: smoothing is chosen and measured better
    assert record.alpha is not None and record.smoothed_error < record.error
    assert record.to_json()["alpha"] == record.alpha
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Mul") == 1
    feed = _feeds(1)[0]
    for got, want in zip(_run(model, feed), _run(before, feed), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    old = {i.name: numpy_helper.to_array(i) for i in before.graph.initializer}
    for init in model.graph.initializer:
        if init.name in ("w1", "w2"):
            new = numpy_helper.to_array(init)
            assert ((new == 0) == (old[init.name] == 0)).all()  # zeros stay zero: N:M is kept


def test_no_outliers_no_gain_means_no_change_when_none_is_the_only_candidate() -> None:
    model = _shared_input_graph()
    records = smooth_model(model, ["mm1", "mm2"], _feeds(), alphas=(None,))
    assert records and records[0].alpha is None
    assert "Mul" not in [n.op_type for n in model.graph.node]


def test_a_weight_read_by_another_node_is_never_scaled() -> None:
    model = _shared_input_graph(share_weight=True)
    # w1 is read by mm1 and mm3: neither input is smoothed (mm1's x would drag mm2 along, mm3's z too)
    assert smoothing_groups(model, ["mm1", "mm2", "mm3"]) == {}
    assert [c.node for c in smoothing_groups(model, ["mm2"])["x"]] == ["mm2"]
    assert smooth_model(model, ["mm1"], _feeds()) == []

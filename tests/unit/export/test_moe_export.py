"""Export pieces of issue 14: the static experts loop, exporter error lines, the ``nmcli.sparse``
ONNX record, embedding tables (Gather) and one copy of a tied table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nmcli.errors import ExportUnsupportedError, InputError
from nmcli.export.onnx import EXPORT_EXPERTS, export_onnx, exportable_experts, exporter_error_line
from nmcli.formats.onnx_layout import (
    WeightMatch,
    find_weights,
    gather_tables,
    set_sparse_layers,
    share_tied_tables,
    sparse_layers,
)
from nmcli.inputs import parse_input_spec
from nmcli.nm.pattern import Pattern

onnx = pytest.importorskip("onnx", reason="onnx is not installed (dev extra)")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def test_exporter_error_line_is_one_line_without_ansi_and_names_the_root_cause() -> None:
    root = KeyError("No ONNX function found for aten._linalg_eigh")
    try:
        try:
            raise root
        except KeyError as exc:
            raise RuntimeError(
                "Failed to convert. \x1b[96mThis is step 3/3\x1b[0m of exporting.\n- Next steps"
            ) from exc
    except RuntimeError as wrapped:
        line = exporter_error_line(wrapped)
    assert line == (
        "RuntimeError: Failed to convert. This is step 3/3 of exporting. ... "
        "KeyError: 'No ONNX function found for aten._linalg_eigh'"
    )
    assert exporter_error_line(ValueError("")) == "ValueError"


def _tied_graph() -> onnx.ModelProto:
    """Gather from table T [4, 2], and a MatMul by a folded copy of T.T [2, 4] (a tied LM head)."""
    table = np.arange(8, dtype=np.float32).reshape(4, 2)
    nodes = [
        helper.make_node("Gather", ["T", "ids"], ["h"], name="embed"),
        helper.make_node("MatMul", ["h", "T_t"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [3, 4])],
        [numpy_helper.from_array(table, "T"), numpy_helper.from_array(table.T.copy(), "T_t")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_share_tied_tables_keeps_one_copy_read_through_a_transpose() -> None:
    model = _tied_graph()
    assert gather_tables(model) == {"T"}
    assert [w.name for w in find_weights(model)] == ["T_t"]
    assert share_tied_tables(model) == {"T_t": "T"}
    assert [i.name for i in model.graph.initializer] == ["T"]
    onnx.checker.check_model(model)
    weights = find_weights(model)
    assert [(w.name, w.axis, w.through) for w in weights] == [("T", 1, ("Transpose",))]  # T.T along -2 = T along 1
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"ids": np.array([0, 3, 1], dtype=np.int64)})
    table = np.arange(8, dtype=np.float32).reshape(4, 2)
    np.testing.assert_array_equal(logits, table[[0, 3, 1]] @ table.T)


def test_share_tied_tables_leaves_different_values_alone() -> None:
    model = _tied_graph()
    head = model.graph.initializer[1]
    head.CopyFrom(numpy_helper.from_array(np.ones((2, 4), dtype=np.float32), "T_t"))
    assert share_tied_tables(model) == {}
    assert len(model.graph.initializer) == 2


def test_sparse_layers_round_trip_and_corrupt_record() -> None:
    model = _tied_graph()
    assert sparse_layers(model) is None
    matches = [
        WeightMatch("experts.up[0]", "T_t", "MatMul", "head", 0, "transposed", True, ""),
        WeightMatch("lost.weight", None, "", "", -1, "", False, "folded"),
    ]
    set_sparse_layers(model, matches, {"experts.up": Pattern(2, 4), "lost.weight": Pattern(2, 4)})
    set_sparse_layers(model, matches, {"experts.up": Pattern(1, 4), "lost.weight": Pattern(2, 4)})  # replaces
    assert [p.key for p in model.metadata_props] == ["nmcli.sparse"]
    assert sparse_layers(model) == {
        "T_t": {"param": "experts.up[0]", "initializer": "T_t", "op": "MatMul", "axis": 0, "n": 1, "m": 4}
    }
    model.metadata_props[0].value = "{not json"
    with pytest.raises(InputError, match=r"nmcli\.sparse"):
        sparse_layers(model)


def test_exportable_experts_switches_to_the_static_loop_and_restores() -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (hf extra)")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    before = model.get_experts_implementation()
    ids = torch.tensor([[3] * 6, [1, 2, 3, 4, 5, 6]])  # the first row routes every token alike
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with exportable_experts(model) as switched:
            assert switched and model.get_experts_implementation()[""] == EXPORT_EXPERTS
            static = model(input_ids=ids).logits
    assert model.get_experts_implementation() == before
    torch.testing.assert_close(static, expected, rtol=0, atol=1e-6)
    with exportable_experts(torch.nn.Linear(2, 2)) as switched:
        assert not switched


def test_exporter_output_never_reaches_stdout(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """TorchScript's C++ side dumps its graph on file descriptor 1 when it fails (a causal LM fed
    ``input_ids`` alone hits ``aten::diff``): the dump is captured onto the error, never on stdout."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (hf extra)")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportUnsupportedError) as info:
        export_onnx(model, parse_input_spec("input_ids:1x8:int64"), out, exporter="torchscript")
    captured = capfd.readouterr()
    assert captured.out == ""
    assert "Torch IR graph at exception" in info.value.exporter_output
    assert info.value.exit_code == 3
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    assert "aten::diff" in str(info.value)
    assert not out.exists()


EIGH_MODEL = """
import torch
from torch import nn


class Eigh(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        return torch.linalg.eigh(y @ y.T)[0]


def model():
    torch.manual_seed(0)
    return Eigh()
"""


def test_cli_exit_3_and_one_json_error_when_torch_cannot_export(tmp_path: Path) -> None:
    from nmcli.cli.app import app

    source = tmp_path / "eigh_model.py"
    source.write_text(EIGH_MODEL)
    runner = CliRunner()
    pruned = tmp_path / "e.safetensors"
    spec = ["--input-shape", "4x8"]
    assert runner.invoke(app, ["prune", f"py:{source}:model", *spec, "-o", str(pruned)]).exit_code == 0
    result = runner.invoke(app, ["export", str(pruned), "--json"])
    assert result.exit_code == 3, result.output
    error = json.loads(result.stdout)["error"]
    assert error["code"] == 3 and error["type"] == "ExportUnsupportedError"
    assert "aten::linalg_eigh" in error["message"] and "aten._linalg_eigh" in error["message"]
    assert "\x1b" not in error["message"]
    assert not (tmp_path / "e.onnx").exists()


def test_find_weights_follows_a_gather_of_one_expert_to_the_stack() -> None:
    """The dynamo exporter can keep an expert stack [E, out, in] whole and Gather W[e] for a Gemm."""
    stack = np.arange(64, dtype=np.float32).reshape(2, 4, 8)
    nodes = [
        helper.make_node("Gather", ["S", "one"], ["w1"], name="pick", axis=0),
        helper.make_node("Gemm", ["x", "w1"], ["y"], name="expert1", transB=1),
        helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
    ]
    graph = helper.make_graph(
        nodes,
        "experts",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [3, 8]),
        ],
        [
            numpy_helper.from_array(stack, "S"),
            numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
            numpy_helper.from_array(np.zeros((5, 8), dtype=np.float32), "E"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    [weight] = find_weights(model)
    assert (weight.name, weight.shape, weight.axis, weight.through) == ("S", (2, 4, 8), 2, ("Gather",))
    assert gather_tables(model) == {"E"}  # the stack picked by Gather is not an embedding table

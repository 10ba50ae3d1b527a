"""``nmcli inspect`` as a CI gate (issue 11): empty files are exit 2, "nothing eligible" is said,
checkpoints are read from the file unless --rebuild, and the TRT 2:4 column gives its reason."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.commands.prune import run_prune
from nmcli.models.layers import tensorrt_reason, tensorrt_usable
from tests.conftest import py_source

runner = CliRunner()


@pytest.fixture()
def mlp_ckpt(tmp_path: Path) -> Path:
    ckpt = tmp_path / "mlp-2of4.safetensors"
    run_prune(py_source("tiny_mlp"), input_shape="4x64", output=ckpt, exclude=["4"])
    return ckpt


def test_empty_onnx_is_exit_2_even_with_strict(tmp_path: Path) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    result = runner.invoke(app, ["inspect", str(empty), "--strict", "--json"])
    assert result.exit_code == 2
    assert "empty" in json.loads(result.stdout)["error"]["message"]


def test_onnx_without_a_graph_is_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "nograph.onnx"
    onnx.save(onnx.ModelProto(), str(path))
    assert runner.invoke(app, ["inspect", str(path), "--strict"]).exit_code == 2


def test_nothing_eligible_is_a_note_and_a_json_field(tmp_path: Path) -> None:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    result = runner.invoke(app, ["inspect", str(path), "--strict", "--json"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["nothing_eligible"] is True and report["eligible_layers"] == 0
    assert "nothing to check" in result.stderr


def test_checkpoint_is_read_from_the_file_unless_rebuild(mlp_ckpt: Path) -> None:
    plain = json.loads(runner.invoke(app, ["inspect", str(mlp_ckpt), "--json"]).stdout)
    assert sorted(layer["param"] for layer in plain["layers"]) == ["0.weight", "2.weight"]
    rebuilt = json.loads(runner.invoke(app, ["inspect", str(mlp_ckpt), "--rebuild", "--json"]).stdout)
    left_dense = [layer for layer in rebuilt["layers"] if layer["param"] == "4.weight"]
    assert len(left_dense) == 1 and not left_dense[0]["eligible"]


def test_trt_column_gives_its_reason() -> None:
    assert tensorrt_reason((64, 64), 1, True) == "" and tensorrt_usable((64, 64), 1, True)
    assert "not 2:4" in tensorrt_reason((64, 64), 1, False)
    assert "input size 32" in tensorrt_reason((64, 32), 1, True)
    assert "output size 40" in tensorrt_reason((40, 64), 1, True)
    assert not tensorrt_usable((40, 64), 1, True)


def test_trt_reason_in_the_report(mlp_ckpt: Path) -> None:
    result = runner.invoke(app, ["inspect", str(mlp_ckpt), "--json"])
    layers = {layer["param"]: layer for layer in json.loads(result.stdout)["layers"]}
    for layer in layers.values():
        assert layer["tensorrt"] == (layer["tensorrt_reason"] == "")

"""``nmcli export`` under issue 11: -0.0 after BatchNorm folding, the verification rule line,
precision-named default outputs, the input spec in metadata_props (read back by bench), and an
ONNX given as the input."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.commands.export import export_paths
from nmcli.commands.prune import run_prune
from nmcli.export.verify import compare_outputs
from nmcli.formats.onnx_layout import INPUT_SPEC_KEY, clear_negative_zeros, find_weights, stored_input_spec
from tests.conftest import py_source

runner = CliRunner()

_NEGATIVE_BN_CNN = """
import torch
from torch import nn


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
    )
    with torch.no_grad():
        for bn in (model[1], model[4]):
            # every other output channel gets a negative scale: folding it flips the sign of zeros
            bn.weight.copy_(torch.linspace(0.5, 1.5, 16) * torch.tensor([1.0, -1.0]).repeat(8))
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()
"""


@pytest.fixture()
def bn_ckpt(tmp_path: Path) -> Path:
    source = tmp_path / "bn_cnn.py"
    source.write_text(textwrap.dedent(_NEGATIVE_BN_CNN))
    ckpt = tmp_path / "bn-2of4.safetensors"
    run_prune(f"py:{source}:build", input_shape="1x8x8x8", output=ckpt)
    return ckpt


@pytest.fixture()
def mlp_ckpt(tmp_path: Path) -> Path:
    ckpt = tmp_path / "mlp-2of4.safetensors"
    run_prune(py_source("tiny_mlp"), input_shape="4x64", output=ckpt)
    return ckpt


# --- item 2: -0.0 after BatchNorm folding --------------------------------------------------------


def test_folded_negative_batchnorm_keeps_every_pruned_layer(bn_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "bn.onnx"
    # the source is a file this test wrote and pruned through the library: trust it on the command line
    result = runner.invoke(app, ["export", str(bn_ckpt), "-o", str(out), "--trust", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["lost_layers"] == [], report["lost_reasons"]
    assert len(report["sparse_initializers"]) == 2
    assert any("-0.0" in note for note in report["notes"])
    model = onnx.load(str(out))
    for weight in find_weights(model):
        values = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == weight.name))
        assert not ((values == 0) & np.signbit(values)).any(), weight.name
    strict = runner.invoke(app, ["inspect", str(out), "--strict"])
    assert strict.exit_code == 0, strict.stderr


def test_compliance_counts_negative_zero_as_zero_and_reports_it(tmp_path: Path) -> None:
    # a 2:4 weight whose pruned zeros are -0.0, as a folded negative scale leaves them
    weight = np.array([[1.0, -0.0, 2.0, -0.0], [-0.0, 3.0, -0.0, 4.0]], dtype=np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(weight.T.copy(), "w")],
    )
    path = tmp_path / "negzero.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    result = runner.invoke(app, ["inspect", str(path), "--strict", "--json"])
    assert result.exit_code == 0, result.stderr
    layer = json.loads(result.stdout)["layers"][0]
    assert layer["compliant"] is True and layer["negative_zeros"] == 4 and layer["sparsity"] == 0.5
    model = onnx.load(str(path))
    assert clear_negative_zeros(model) == {"w": 4}
    cleared = numpy_helper.to_array(model.graph.initializer[0])
    assert not np.signbit(cleared[cleared == 0]).any()
    assert np.array_equal(cleared, weight.T)


# --- item 9: the verification line states the rule and its worst element ---------------------


def test_verify_reports_the_worst_element_by_the_rule() -> None:
    # element 0: diff 0.05 on |ref| 100 is allowed (1e-4 + 1e-3 * 100 = 0.1001); element 1: diff
    # 1e-5 on |ref| 0.001 has the largest relative diff (0.01) but is well inside its allowance.
    ref = np.array([100.0, 0.001, 1.0], dtype=np.float32)
    got = np.array([100.05, 0.00101, 1.0], dtype=np.float32)
    run = compare_outputs("1x3", [ref], [got], atol=1e-4, rtol=1e-3)
    assert run.passed
    assert run.worst_reference == pytest.approx(100.0)
    assert run.worst_diff == pytest.approx(0.05, rel=1e-3)
    assert run.worst_allowed == pytest.approx(1e-4 + 1e-3 * 100.0)
    assert run.max_rel_diff == pytest.approx(0.01, rel=1e-2)
    assert "<= allowed" in run.summary()
    bad = compare_outputs("1x3", [ref], [got], atol=1e-4, rtol=1e-4)
    assert not bad.passed and "> allowed" in bad.summary()


def test_export_line_states_the_rule(mlp_ckpt: Path) -> None:
    result = runner.invoke(app, ["export", str(mlp_ckpt)])
    assert result.exit_code == 0, result.stderr
    line = next(x for x in result.stderr.splitlines() if "onnxruntime vs torch" in x)
    assert "atol + rtol * |torch|" in line and "worst element" in line and "rel " not in line


# --- item 10: precision-named default outputs ---------------------------------------------------


def test_default_names_carry_the_precision() -> None:
    assert export_paths("m.safetensors", onnx=True, trt=False, compress=False, output=None).onnx == Path("m.onnx")
    fp16 = export_paths("m.safetensors", onnx=True, trt=True, compress=False, output=None, precision="fp16")
    assert (fp16.onnx, fp16.engine) == (Path("m-fp16.onnx"), Path("m-fp16.engine"))
    int8 = export_paths("m.safetensors", onnx=False, trt=True, compress=False, output=None, precision="int8")
    assert (int8.onnx, int8.engine) == (Path("m-int8.onnx"), Path("m-int8.engine"))  # the Q/DQ ONNX (issue 21)


def test_fp16_export_after_fp32_export(mlp_ckpt: Path) -> None:
    assert runner.invoke(app, ["export", str(mlp_ckpt), "--no-verify"]).exit_code == 0
    result = runner.invoke(app, ["export", str(mlp_ckpt), "--precision", "fp16", "--no-verify"])
    assert result.exit_code == 0, result.stderr
    assert mlp_ckpt.with_suffix(".onnx").is_file() and (mlp_ckpt.parent / "mlp-2of4-fp16.onnx").is_file()


# --- item 11: the input spec in metadata_props, used by bench -----------------------------------


def test_dynamic_export_records_its_input_spec_and_bench_uses_it(mlp_ckpt: Path) -> None:
    result = runner.invoke(app, ["export", str(mlp_ckpt), "--dynamic-batch", "--no-verify"])
    assert result.exit_code == 0, result.stderr
    onnx_path = mlp_ckpt.with_suffix(".onnx")
    assert stored_input_spec(onnx_path) == "4x64"
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert props[INPUT_SPEC_KEY] == "4x64"
    bench = runner.invoke(
        app, ["bench", str(onnx_path), "--batch-size", "1,8", "--warmup", "1", "--iters", "2", "--json"]
    )
    assert bench.exit_code == 0, bench.stderr + bench.stdout
    assert "1,8" not in bench.stderr or "dynamic dimensions" not in bench.stderr


# --- item 8: an ONNX as export's input ----------------------------------------------------------


def test_export_of_an_onnx_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "rand.onnx"
    path.write_bytes(bytes(range(256)))
    result = runner.invoke(app, ["export", str(path)])
    assert result.exit_code == 2
    assert "already an ONNX file" in result.stderr and "also an input" not in result.stderr
    assert path.read_bytes() == bytes(range(256))

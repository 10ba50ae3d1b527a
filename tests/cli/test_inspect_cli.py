"""``nmcli inspect``: checkpoints, model sources and ONNX files; --strict, --pattern, --json."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.commands.inspect import run_inspect
from nmcli.nm.masks import apply_mask, nm_mask
from nmcli.nm.pattern import Pattern
from tests.conftest import MODELS_PY, py_source

runner = CliRunner()
LAYER_KEYS = {"param", "shape", "sparsity", "compliant", "eligible"}


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def _json(result: Result) -> dict[str, Any]:
    assert result.stdout.count("\n") == 1, result.stdout
    report = json.loads(result.stdout)
    assert set(report) == {
        "target",
        "pattern",
        "compliant",
        "eligible_layers",
        "nothing_eligible",
        "integrity",
        "tampered_files",
        "masks_only",
        "layers",
    }
    assert all(set(layer) >= LAYER_KEYS for layer in report["layers"])
    return report


def _layers(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {layer["param"]: layer for layer in report["layers"]}


@pytest.fixture()
def cnn_ckpt(workdir: Path) -> Path:
    result = invoke("prune", py_source("tiny_cnn"), "-o", "cnn.safetensors")
    assert result.exit_code == 0, result.output
    return workdir / "cnn.safetensors"


# --------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_strict_passes(cnn_ckpt: Path) -> None:
    result = invoke("inspect", str(cnn_ckpt), "--strict", "--rebuild", "--json")
    assert result.exit_code == 0, result.output
    report = _json(result)
    assert report["target"] == str(cnn_ckpt) and report["pattern"] == "2:4" and report["compliant"] is True
    layers = _layers(report)
    assert list(layers) == ["0.weight", "2.weight", "5.weight", "8.weight", "10.weight"]
    assert layers["2.weight"] | {"reason": ""} == layers["2.weight"]
    assert layers["2.weight"]["shape"] == [32, 16, 3, 3] and layers["2.weight"]["sparsity"] == 0.5
    assert layers["2.weight"]["eligible"] and layers["2.weight"]["compliant"] and layers["2.weight"]["axis"] == 1
    # Skipped by prune: listed with the reason, not eligible, and dense.
    assert not layers["0.weight"]["eligible"] and "multiple of M=4" in layers["0.weight"]["reason"]
    assert not layers["5.weight"]["eligible"] and "groups=4" in layers["5.weight"]["reason"]
    assert layers["5.weight"]["sparsity"] == 0.0 and not layers["5.weight"]["tensorrt"]
    # TensorRT: reduction 512 >= 64 and 64 outputs -> yes; 10 outputs -> no; reduction 16 -> no.
    assert layers["8.weight"]["tensorrt"] and not layers["10.weight"]["tensorrt"] and not layers["2.weight"]["tensorrt"]


def test_checkpoint_default_pattern_is_its_own(workdir: Path) -> None:
    assert invoke("prune", py_source("tiny_mlp"), "-p", "1:4", "-o", "m.safetensors").exit_code == 0
    report = _json(invoke("inspect", "m.safetensors", "--json"))
    assert report["pattern"] == "1:4" and report["compliant"] is True
    assert all(layer["sparsity"] == 0.75 for layer in report["layers"])


def test_stricter_pattern_fails(cnn_ckpt: Path) -> None:
    result = invoke("inspect", str(cnn_ckpt), "--pattern", "1:4", "--strict", "--json")
    assert result.exit_code == 1
    report = _json(result)
    assert report["pattern"] == "1:4" and report["compliant"] is False
    assert {p for p, layer in _layers(report).items() if layer["eligible"] and not layer["compliant"]} == {
        "2.weight",
        "8.weight",
        "10.weight",
    }
    line = result.stderr.strip().splitlines()[-1]
    assert (
        line.startswith("error: 3 of 3 eligible layer(s)")
        and "not 1:4-compliant: 2.weight, 8.weight, 10.weight" in line
    )


def test_layers_left_dense_are_not_eligible(workdir: Path) -> None:
    assert invoke("prune", py_source("tiny_cnn"), "--exclude", "10", "-o", "c.safetensors").exit_code == 0
    result = invoke("inspect", "c.safetensors", "--strict", "--rebuild", "--json")
    assert result.exit_code == 0
    head = _layers(_json(result))["10.weight"]
    assert not head["eligible"] and not head["compliant"] and "not pruned" in head["reason"]


def test_checkpoint_whose_source_moved(workdir: Path) -> None:
    shutil.copy(MODELS_PY, workdir / "moved.py")
    assert invoke("prune", "py:moved.py:tiny_mlp", "-o", "m.safetensors").exit_code == 0
    (workdir / "moved.py").unlink()
    result = invoke("inspect", "m.safetensors", "--strict", "--rebuild", "--json")
    assert result.exit_code == 0, result.output
    assert [layer["param"] for layer in _json(result)["layers"]] == ["0.weight", "2.weight", "4.weight"]
    assert "could not be rebuilt" in result.stderr and "--arch" in result.stderr
    # --arch names the architecture explicitly; a wrong one is an error.
    assert invoke("inspect", "m.safetensors", "--arch", py_source("tiny_mlp"), "--json").exit_code == 0
    bad = invoke("inspect", "m.safetensors", "--arch", py_source("tiny_cnn"))
    assert bad.exit_code == 2 and "does not fit the architecture" in bad.stderr


def test_tiny_gpt2_conv1d_along_dim_0(tiny_gpt2_dir: Path, workdir: Path) -> None:
    assert invoke("prune", f"hf:{tiny_gpt2_dir}", "-o", "g.safetensors").exit_code == 0
    report = _json(invoke("inspect", "g.safetensors", "--strict", "--rebuild", "--json"))
    c_attn = _layers(report)["transformer.h.0.attn.c_attn.weight"]
    assert c_attn["axis"] == 0 and c_attn["shape"] == [32, 96] and c_attn["compliant"] and c_attn["eligible"]
    assert report["compliant"] is True
    assert not _layers(report)["lm_head.weight"]["eligible"]  # tied to the embedding


# --------------------------------------------------------------------------------------------
# Model sources


def test_dense_model_fails_strict_and_human_output(workdir: Path) -> None:
    result = invoke("inspect", py_source("tiny_attention"), "--strict")
    assert result.exit_code == 1 and result.stdout == ""
    assert "attn.in_proj_weight" in result.stderr
    assert "0 of 3 eligible layers are 2:4" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: 3 of 3 eligible layer(s)")
    assert invoke("inspect", py_source("tiny_attention")).exit_code == 0  # without --strict: a report only


def test_model_that_is_already_sparse(workdir: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 30))
    with torch.no_grad():
        w = model[0].weight
        w.copy_(apply_mask(w, nm_mask(w, Pattern(2, 4), 1)))
    torch.jit.script(model).save("sparse.pt")
    report = _json(invoke("inspect", "sparse.pt", "--json"))
    first, second = report["layers"]
    assert first["compliant"] and first["eligible"] and first["tensorrt"] and first["sparsity"] == 0.5
    assert not second["compliant"] and not second["tensorrt"]


def test_negative_zero_counts_as_zero_and_is_reported(workdir: Path) -> None:
    # issue 11: -0.0 is what BatchNorm folding leaves; Polygraphy counts it as zero, and so do we
    model = torch.nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -0.0, -0.0, 1.0] * 2] * 4))
    torch.jit.script(model).save("negzero.pt")
    (layer,) = _json(invoke("inspect", "negzero.pt", "--json"))["layers"]
    assert layer["sparsity"] == 0.5 and layer["compliant"] and layer["negative_zeros"] == 16


# --------------------------------------------------------------------------------------------
# ONNX


def _onnx_model(path: Path) -> dict[str, np.ndarray]:
    """A hand-built graph: MatMul [K,N] (axis 0), Gemm transB=1 (axis 1), Gemm transB=0 (axis 0), Conv, grouped Conv."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def nm(shape: tuple[int, ...], axis: int) -> np.ndarray:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape) + axis))
        return apply_mask(w, nm_mask(w, Pattern(2, 4), axis)).numpy()

    weights = {
        "matmul_w": nm((64, 32), 0),  # 2:4 down the columns only
        "gemm_t_w": nm((32, 32), 1),
        "gemm_w": nm((32, 64), 1),  # transB=0 reduces along axis 0: rows-wise 2:4 is the wrong axis
        "conv_w": nm((8, 4, 3, 3), 1),
        "dw_w": torch.randn(8, 1, 3, 3).numpy(),  # depthwise: never eligible
    }
    nodes = [
        helper.make_node("MatMul", ["x", "matmul_w"], ["h1"], name="mm"),
        helper.make_node("Gemm", ["h1", "gemm_t_w"], ["h2"], name="gemm_t", transB=1),
        helper.make_node("Gemm", ["h2", "gemm_w"], ["y"], name="gemm"),
        helper.make_node("Conv", ["img", "conv_w"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "dw_w"], ["c2"], name="dw", group=8, pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 4, 8, 8]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64]),
            helper.make_tensor_value_info("c2", TensorProto.FLOAT, [1, 8, 8, 8]),
        ],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return weights


def test_onnx_axes(workdir: Path) -> None:
    pytest.importorskip("onnx")
    _onnx_model(workdir / "m.onnx")
    result = invoke("inspect", "m.onnx", "--json")
    assert result.exit_code == 0, result.output
    layers = _layers(_json(result))
    assert {k: (v["axis"], v["compliant"], v["eligible"]) for k, v in layers.items()} == {
        "matmul_w": (0, True, True),
        "gemm_t_w": (1, True, True),
        "gemm_w": (0, False, True),
        "conv_w": (1, True, True),
        "dw_w": (1, False, False),
    }
    assert layers["matmul_w"]["kind"] == "MatMul" and layers["matmul_w"]["sparsity"] == 0.5
    strict = invoke("inspect", "m.onnx", "--strict")
    assert strict.exit_code == 1 and "gemm_w" in strict.stderr.strip().splitlines()[-1]


def test_onnx_core_matches_cli(workdir: Path) -> None:
    pytest.importorskip("onnx")
    _onnx_model(workdir / "m.onnx")
    report = run_inspect("m.onnx", pattern="2:4")
    assert report.kind == "onnx" and [v.param for v in report.violations] == ["gemm_w"]


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.safetensors"], "does not exist"),
        (["missing.onnx"], "missing.onnx does not exist"),
        (["noise.onnx"], "not a readable ONNX file"),
        (["noise.safetensors"], "not a readable safetensors file"),
        ([py_source("tiny_mlp"), "--pattern", "3:3"], "0 < N < M <= 32"),
        ([py_source("tiny_mlp"), "--pattern", "half"], "malformed pattern"),
        (["pickled.pt"], "pass --trust"),
        # a state dict without --arch is inspected with inferred layers (issue 13); with a wrong one:
        (["state.pt", "--arch", py_source("tiny_cnn")], "does not fit the architecture"),
    ],
)
def test_errors_exit_2_one_line(workdir: Path, args: list[str], message: str) -> None:
    noise = random.Random(0).randbytes(1024)
    (workdir / "noise.onnx").write_bytes(noise)
    (workdir / "noise.safetensors").write_bytes(noise)
    torch.save(torch.nn.Linear(4, 4), workdir / "pickled.pt")
    torch.save(torch.nn.Linear(4, 4).state_dict(), workdir / "state.pt")
    before = sorted(p.name for p in workdir.iterdir())
    result = invoke("inspect", *args, "--json")
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]  # the one JSON object of a failure (issue 11)
    assert error["code"] == 2 and message in error["message"]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert sorted(p.name for p in workdir.iterdir()) == before


def test_pickle_with_trust(workdir: Path) -> None:
    torch.save(torch.nn.Sequential(torch.nn.Linear(8, 4)), workdir / "pickled.pt")
    report = _json(invoke("inspect", "pickled.pt", "--trust", "--json"))
    assert [layer["param"] for layer in report["layers"]] == ["0.weight"]


def test_console_script_strict(nmcli_exe: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [nmcli_exe, "inspect", py_source("tiny_mlp"), "--strict", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["compliant"] is False
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("error:")

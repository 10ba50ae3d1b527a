"""Messages a newcomer meets (issue 23): one line each, saying what is true and the one fix that works."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from fixtures.models import tiny_mlp
from nmcli.cli.app import app
from nmcli.formats.torchfiles import traced_inputs
from nmcli.models.layers import tensorrt_reason
from tests.conftest import py_source


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_bench_fixed_batch_onnx_says_re_export_with_dynamic_batch(workdir: Path) -> None:
    code, _, err = run("prune", py_source("tiny_mlp"), "-p", "2:4", "--input-shape", "2x64", "-o", "m.safetensors")
    assert code == 0, err
    code, _, err = run("export", "m.safetensors", "--onnx", "--no-verify")
    assert code == 0, err
    code, _, err = run("bench", "m.onnx", "--batch-size", "1,8", "--iters", "2", "--warmup", "1")
    line = one_line(err)
    assert code == 2 and "fixed at 2" in line and "--dynamic-batch" in line and "--input-shape" not in line


def test_finetune_of_a_state_dict_says_prune_it_first(workdir: Path) -> None:
    torch.save(tiny_mlp().state_dict(), "model_sd.pt")
    save_file({"inputs": torch.randn(8, 64), "targets": torch.randint(0, 10, (8,))}, "d.safetensors")
    code, _, err = run("finetune", "model_sd.pt", "--data", "tensors:d.safetensors", "--steps", "1")
    line = one_line(err)
    assert code == 2 and "not an nmcli checkpoint" in line and "nmcli prune model_sd.pt" in line
    assert "safetensors file" not in line


def test_remote_urls_say_download_first(workdir: Path) -> None:
    for args in (["prune", "s3://bucket/model.pt"], ["inspect", "https://example.org/m.safetensors"]):
        code, _, err = run(*args)
        line = one_line(err)
        assert code == 2 and "remote URLs are not supported" in line and "download" in line
        assert "output folder" not in line


def test_a_directory_named_like_a_file_is_a_directory(workdir: Path) -> None:
    (workdir / "dir.onnx").mkdir()
    for command in ("inspect", "bench"):
        code, _, err = run(command, "dir.onnx")
        line = one_line(err)
        assert code == 2 and "is a directory" in line and "does not exist" not in line


def test_tensorrt_reason_words() -> None:
    assert tensorrt_reason((64, 48), 1, True) == "input size 48 is not a multiple of 32"
    assert tensorrt_reason((64, 32), 1, True) == "input size 32 is below 64"
    assert tensorrt_reason((64, 64), 1, True) == ""


def test_infer_layers_counts_weights_not_biases(workdir: Path) -> None:
    torch.save(tiny_mlp().state_dict(), "sd.pt")
    code, _, err = run("prune", "sd.pt", "-p", "2:4", "--infer-layers")
    assert code == 0, err
    assert "pruned 3 of 3 layers" in err
    assert "bias" not in err.split("pruned 3 of 3")[0]  # no bias rows in the table


def test_click_usage_errors_are_one_line(workdir: Path) -> None:
    for args in (["prune", "--bogus"], ["prune"], ["export", "x.safetensors", "--opset", "abc"]):
        code, _, err = run(*args)
        assert code == 2
        one_line(err)


def test_traced_inputs_are_read_without_running_code(tmp_path: Path) -> None:
    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    path = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(Net(), (torch.randn(3, 5),)), str(path))
    found = traced_inputs(path)
    assert found is not None and [(t.shape, t.dtype) for t in found] == [((3, 5), "float32")]
    # a traced_inputs.pkl that names any other global is refused, never run
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("traced_inputs.pkl"):
                buf = io.BytesIO()
                pickle.dump({"forward": [print]}, buf, protocol=2)
                data = buf.getvalue()
            dst.writestr(item, data)
    assert traced_inputs(evil) is None

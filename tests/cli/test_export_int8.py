"""``nmcli export --precision int8`` is refused with exit 2 before anything is written.

nmcli takes no calibration data, and INT8 without it is not INT8 (TensorRT falls back to FP16 for
tensors without dynamic ranges; ``trtexec --int8`` alone uses placeholder ranges). See
``nmcli.export.tensorrt.check_trt_precision``.
"""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.commands.prune import run_prune
from tests.conftest import py_source

runner = CliRunner()


def test_int8_is_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    ckpt = tmp_path / "mlp.safetensors"
    run_prune(py_source("tiny_mlp"), input_shape="1x64", output=ckpt)
    before = ckpt.read_bytes()
    for extra in ((), ("--trt", "--sparse"), ("--onnx", "-o", str(tmp_path / "out.onnx"))):
        result = runner.invoke(app, ["export", str(ckpt), "--precision", "int8", *extra])
        assert result.exit_code == 2, result.output
        assert "calibration data" in result.stderr and "--precision fp16" in result.stderr
        assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.safetensors"]
    assert ckpt.read_bytes() == before

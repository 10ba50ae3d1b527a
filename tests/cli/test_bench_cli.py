"""``nmcli bench`` end to end on the CPU torch path: the JSON schema, the table, --output, exit codes.

Tests check correctness and schema with tiny --iters; they never judge timings. Every test that
assumes the CPU says ``--device cpu`` (FAST carries it), so the suite passes on a CUDA machine too,
where bench defaults to cuda and fp16.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.commands.prune import run_prune
from tests.conftest import py_source

runner = CliRunner()
CPU = ("--device", "cpu")
FAST = ("--iters", "3", "--warmup", "1", *CPU)


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny MLP pruned 2:4 twice: without dense weights (dense rebuilt from source) and with them."""
    folder = tmp_path_factory.mktemp("bench")
    out = {}
    for name, keep in (("plain", False), ("kept", True)):
        path = folder / f"mlp-{name}.safetensors"
        run_prune(py_source("tiny_mlp"), input_shape="1x64", output=path, keep_dense=keep)
        out[name] = path
    return out


def _json(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _check_schema(data: dict[str, Any], variants: list[str], sizes: list[int]) -> None:
    assert {"backend", "device", "environment", "results", "speedup"} <= set(data)
    env = data["environment"]
    for key in ("machine", "cpu", "torch", "onnxruntime", "tensorrt", "torch_threads", "settings"):
        assert key in env
    assert [(r["variant"], r["batch_size"]) for r in data["results"]] == [(v, b) for v in variants for b in sizes]
    for row in data["results"]:
        lat = row["latency_ms"]
        assert {"p50", "p90", "p99", "mean"} <= set(lat)
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert row["iterations"] == 3
        assert row["throughput"] == pytest.approx(row["batch_size"] * 1000 / lat["mean"])
        assert "peak_memory_mb" in row


def test_cpu_torch_checkpoint_json(ckpts: dict[str, Path]) -> None:
    data = _json(invoke("bench", str(ckpts["kept"]), "--batch-size", "1,4", "--json", *FAST))
    assert data["backend"] == "torch" and data["device"] == "cpu" and data["precision"] == "fp32"
    _check_schema(data, ["dense", "sparse"], [1, 4])
    assert data["sparse_kernel"] is False
    assert all(r["peak_memory_mb"] is None for r in data["results"])  # CPU: documented as not measured
    assert [s["batch_size"] for s in data["speedup"]] == [1, 4]
    by = {(r["variant"], r["batch_size"]): r["latency_ms"]["p50"] for r in data["results"]}
    for s in data["speedup"]:
        assert s["sparse_over_dense"] == pytest.approx(by[("dense", s["batch_size"])] / by[("sparse", s["batch_size"])])
        assert s["outputs_max_abs_diff"] > 0  # the dense model really is the unpruned one
    assert data["environment"]["settings"]["dense_weights"] == "stored in the checkpoint"
    assert data["agreement"] == [] and data["agreement_ok"] is True  # no sparse kernel ran: nothing to check
    sparse = next(v for v in data["variants"] if v["variant"] == "sparse")
    assert any(n.startswith("no sparse kernel was used") for n in sparse["notes"])


def test_dense_variant_rebuilt_from_source(ckpts: dict[str, Path]) -> None:
    data = _json(invoke("bench", str(ckpts["plain"]), "--json", *FAST))
    assert data["environment"]["settings"]["dense_weights"].startswith("rebuilt from the source py:")
    assert data["input_spec"] == "1x64" and data["speedup"][0]["outputs_max_abs_diff"] > 0


def test_table_on_stderr_says_no_sparse_kernel(ckpts: dict[str, Path]) -> None:
    result = invoke("bench", str(ckpts["kept"]), "--batch-size", "2", *FAST)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    for text in ("p50 ratio", "dense", "sparse", "no sparse kernel was used", "torch 2.", "95% interval"):
        assert text in result.stderr
    # CPU: said plainly, and never called a speed-up (issue 23)
    assert "CPU has no 2:4 sparse kernel" in " ".join(result.stderr.split())
    assert "speed-up" not in result.stderr


def test_output_file_is_written_and_never_clobbered(ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = invoke("bench", str(ckpts["kept"]), "--output", str(out), *FAST)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    _check_schema(data, ["dense", "sparse"], [1])
    assert data["output"] == str(out)
    again = invoke("bench", str(ckpts["kept"]), "--output", str(out), *FAST)
    assert again.exit_code == 2 and "--force" in again.stderr
    forced = invoke(
        "bench", str(ckpts["kept"]), "--output", str(out), "--force", "--min-time", "0", "--warmup", "0", *CPU
    )
    assert forced.exit_code == 0, forced.output
    assert json.loads(out.read_text())["environment"]["settings"]["min_time_s"] == 0.0
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary files left


def test_plain_model_source_with_input_shape() -> None:
    data = _json(
        invoke("bench", py_source("tiny_cnn"), "--input-shape", "1x3x8x8", "--batch-size", "2", "--json", *FAST)
    )
    _check_schema(data, ["model"], [2])
    assert data["speedup"] == []
    missing = invoke("bench", py_source("tiny_cnn"), *FAST)
    assert missing.exit_code == 2 and "--input-shape" in missing.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_device_cuda_without_cuda_is_exit_3(ckpts: dict[str, Path]) -> None:
    for device in ("cuda", "cuda:0", "cuda:1"):
        result = invoke("bench", str(ckpts["kept"]), "--iters", "3", "--device", device)
        assert result.exit_code == 3, result.output
        assert "CUDA" in result.stderr and "--device cpu" in result.stderr and "Traceback" not in result.output


def test_cuda_index_beyond_the_devices_is_exit_2(ckpts: dict[str, Path]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("the no-CUDA path is exit 3 (test above)")
    result = invoke("bench", str(ckpts["kept"]), "--iters", "3", "--device", f"cuda:{torch.cuda.device_count()}")
    assert result.exit_code == 2 and "torch sees" in result.stderr


def test_tensorrt_without_tensorrt_is_exit_3(tmp_path: Path) -> None:
    from nmcli.bench import tensorrt_backend

    if tensorrt_backend.is_available():
        pytest.skip("tensorrt is installed here")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not checked before the package")
    for args in (
        ("bench", str(engine)),
        ("bench", str(engine), "--backend", "tensorrt", "--device", "cuda"),
        ("bench", str(engine), "--device", "cuda:1"),
    ):
        result = invoke(*args)
        assert result.exit_code == 3, result.output
        assert "tensorrt" in result.stderr and "pip install" in result.stderr


def test_tensorrt_engine_on_the_cpu_is_exit_2(tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"never read: the device is checked first")
    result = invoke("bench", str(engine), *CPU)
    assert result.exit_code == 2, result.output
    assert "CUDA GPUs only" in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--iters", "3", "--min-time", "1"), "not both"),
        (("--batch-size", "0"), "--batch-size"),
        (("--precision", "int4"), "--precision"),
        (("--device", "tpu"), "--device"),
        (("--device", "cuda:x"), "--device"),
        (("--backend", "onnxruntime"), "onnx"),
        (("--vs", "other.safetensors"), "--vs"),
        (("--warmup", "-1"), "--warmup"),
    ],
)
def test_bad_usage_is_exit_2(ckpts: dict[str, Path], args: tuple[str, ...], expected: str) -> None:
    result = invoke("bench", str(ckpts["kept"]), *args, *(() if "--device" in args else CPU))
    assert result.exit_code == 2, result.output
    assert expected in result.stderr


def test_real_process_prints_only_json_on_stdout(ckpts: dict[str, Path], nmcli_exe: str) -> None:
    proc = subprocess.run(
        [nmcli_exe, "bench", str(ckpts["kept"]), "--json", *FAST], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["backend"] == "torch" and len(proc.stdout.strip().splitlines()) == 1

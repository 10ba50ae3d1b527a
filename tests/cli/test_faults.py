"""Faults are clean errors (issue 19): OS errors on output, device/FIFO outputs, long names, data
that does not fit the model, and --json usage errors. Real OS errors, no mocks. Each case: the
documented exit code, one line on stderr, nothing partial written, inputs unchanged."""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner, Result

from nmcli.cli.app import app
from tests.conftest import py_source

runner = CliRunner()
CNN = py_source("tiny_cnn")


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def one_line(result: Result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.output
    return lines[0]


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'}): needs root in a container")


@pytest.fixture()
def full_dir(workdir: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: any checkpoint fills it (a real ENOSPC)."""
    where = workdir / "full"
    _mount_tmpfs(where, "size=64k")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture()
def pruned(workdir: Path) -> Path:
    result = invoke("prune", CNN, "-o", "cnn.safetensors")
    assert result.exit_code == 0, result.output
    return workdir / "cnn.safetensors"


@pytest.fixture()
def cnn_data(workdir: Path) -> Path:
    torch.manual_seed(0)
    path = workdir / "good.safetensors"
    save_file({"inputs": torch.randn(8, 3, 8, 8), "targets": torch.randint(0, 10, (8,))}, str(path))
    return path


@pytest.fixture()
def bad_data(workdir: Path) -> Path:
    path = workdir / "bad.safetensors"
    save_file({"inputs": torch.randn(8, 1, 8, 8), "targets": torch.randint(0, 10, (8,))}, str(path))
    return path


# ---- OS errors on output ------------------------------------------------------------------


def test_prune_on_a_full_file_system(full_dir: Path) -> None:
    line = one_line(invoke("prune", CNN, "-o", str(full_dir / "o.safetensors")))
    assert f"cannot write {full_dir / 'o.safetensors'}: no space left on device" in line
    assert os.listdir(full_dir) == []


def test_json_error_object_on_a_full_file_system(full_dir: Path) -> None:
    result = invoke("prune", CNN, "-o", str(full_dir / "o.safetensors"), "--json")
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert error["code"] == 2 and error["type"] == "OutputWriteError" and "no space left" in error["message"]


def test_export_compress_on_a_full_file_system(full_dir: Path, pruned: Path) -> None:
    before = pruned.read_bytes()
    line = one_line(invoke("export", str(pruned), "--compress", "-o", str(full_dir / "c.safetensors")))
    assert "no space left on device" in line and os.listdir(full_dir) == [] and pruned.read_bytes() == before


def test_onnx_export_on_a_full_file_system(full_dir: Path, pruned: Path) -> None:
    (full_dir / "fill").write_bytes(b"\0" * 60_000)
    args = ("export", str(pruned), "--input-shape", "1x3x8x8", "--no-verify", "-o", str(full_dir / "x.onnx"))
    line = one_line(invoke(*args))
    assert "cannot write" in line and "no space left on device" in line and "torch cannot export" not in line
    assert os.listdir(full_dir) == ["fill"]


def test_sad_plot_on_a_full_file_system(full_dir: Path, pruned: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (plot extra)")
    (full_dir / "fill").write_bytes(b"\0" * 60_000)
    result = invoke("sad", str(pruned), str(pruned), "--plot", str(full_dir / "p.png"))
    assert result.exit_code == 2, result.output
    assert "error: cannot write" in result.stderr and "no space left on device" in result.stderr
    assert "internal error" not in result.stderr and os.listdir(full_dir) == ["fill"]


def test_finetune_on_a_full_file_system(full_dir: Path, pruned: Path, cnn_data: Path) -> None:
    (full_dir / "fill").write_bytes(b"\0" * 60_000)
    args = ("finetune", str(pruned), "--data", f"tensors:{cnn_data}", "--batch-size", "4", "--steps", "1")
    line = one_line(invoke(*args, "-o", str(full_dir / "ft.safetensors")))
    assert "no space left on device" in line and os.listdir(full_dir) == ["fill"]


def test_sharded_prune_on_a_full_file_system(full_dir: Path, tiny_gpt2_dir: Path) -> None:
    line = one_line(invoke("prune", str(tiny_gpt2_dir), "-o", str(full_dir / "outdir")))
    assert f"cannot write {full_dir / 'outdir'}: no space left on device" in line and os.listdir(full_dir) == []


def test_read_only_file_system(workdir: Path) -> None:
    where = workdir / "ro"
    _mount_tmpfs(where, "size=1m,ro")
    try:
        line = one_line(invoke("prune", CNN, "-o", str(where / "o.safetensors")))
        assert "read-only file system" in line
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder: permissions do not apply")
def test_read_only_folder(workdir: Path) -> None:
    folder = workdir / "locked"
    folder.mkdir(mode=0o555)
    line = one_line(invoke("prune", CNN, "-o", str(folder / "o.safetensors")))
    assert "not writable" in line or "permission denied" in line.lower()


def _small_fsize() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_file_size_limit_is_exit_2(workdir: Path, nmcli_exe: str) -> None:
    proc = subprocess.run(
        [nmcli_exe, "prune", CNN, "-o", "o.safetensors"], preexec_fn=_small_fsize, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write o.safetensors: file too large" in lines[0]
    assert [n for n in os.listdir(workdir) if "o.safetensors" in n] == []


# ---- non-regular outputs and long names ---------------------------------------------------


def test_device_node_is_never_replaced(workdir: Path) -> None:
    # A private copy of /dev/full (char 1:7): a regression replaces this node, never the system's.
    full = workdir / "full"
    try:
        os.mknod(full, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    except OSError as exc:
        pytest.skip(f"cannot create a device node here ({exc.strerror}): needs root")
    line = one_line(invoke("prune", CNN, "-o", str(full), "--force"))
    assert "character device" in line and full.is_char_device() and os.listdir(workdir) == ["full"]


def test_fifo_output_refused(workdir: Path) -> None:
    os.mkfifo(workdir / "pipe")
    line = one_line(invoke("prune", CNN, "-o", "pipe", "--force"))
    assert "is a FIFO" in line and (workdir / "pipe").is_fifo() and os.listdir(workdir) == ["pipe"]


def test_fifo_as_an_output_directory_refused(workdir: Path, tiny_gpt2_dir: Path) -> None:
    os.mkfifo(workdir / "outdir")
    line = one_line(invoke("prune", str(tiny_gpt2_dir), "-o", "outdir", "--force"))
    assert "not a directory" in line and (workdir / "outdir").is_fifo()


def test_300_character_name(workdir: Path) -> None:
    line = one_line(invoke("prune", CNN, "-o", "a" * 300 + ".safetensors"))
    assert "file name too long" in line and os.listdir(workdir) == []


# ---- data that does not fit the model -----------------------------------------------------


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibration_of_the_wrong_shape(workdir: Path, bad_data: Path, method: str) -> None:
    result = invoke("prune", CNN, "--method", method, "--calib", f"tensors:{bad_data}", "-o", "o.safetensors")
    line = one_line(result)
    assert f"--calib tensors:{bad_data} does not fit the model" in line and "8x1x8x8 float32" in line
    assert "3 input channels" in line and not (workdir / "o.safetensors").exists()


def test_finetune_data_of_the_wrong_shape(pruned: Path, bad_data: Path) -> None:
    line = one_line(invoke("finetune", str(pruned), "--data", f"tensors:{bad_data}", "--batch-size", "4"))
    assert "--data" in line and "does not fit the model" in line and "4x1x8x8 float32" in line


def test_finetune_eval_data_of_the_wrong_shape(pruned: Path, cnn_data: Path, bad_data: Path) -> None:
    args = ("finetune", str(pruned), "--data", f"tensors:{cnn_data}", "--eval-data", f"tensors:{bad_data}")
    line = one_line(invoke(*args, "--batch-size", "4", "--steps", "1", "-o", "ft.safetensors"))
    assert f"--eval-data tensors:{bad_data} does not fit the model" in line
    assert not Path("ft.safetensors").exists()


# ---- --json anywhere, usage errors --------------------------------------------------------


def test_json_before_the_command(workdir: Path) -> None:
    before, after = invoke("--json", "inspect", "MISSING"), invoke("inspect", "MISSING", "--json")
    assert before.exit_code == after.exit_code == 2
    assert json.loads(before.stdout) == json.loads(after.stdout)
    assert json.loads(before.stdout)["error"]["type"] == "SourceError"


@pytest.mark.parametrize(
    ("argv", "kind"),
    [
        (["inspect", "x", "--bogus", "--json"], "NoSuchOption"),
        (["--json", "inspect"], "MissingParameter"),
        (["--json", "nope"], "UsageError"),
        (["prune", "x", "--calib-samples", "many", "--json"], "BadParameter"),
        (["--json"], "UsageError"),
    ],
)
def test_usage_errors_under_json(argv: list[str], kind: str) -> None:
    result = invoke(*argv)
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert error["code"] == 2 and error["type"] == kind and error["message"]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--help" in lines[0]


def test_usage_error_is_one_line_without_json() -> None:
    result = invoke("inspect", "x", "--bogus")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == "error: No such option: --bogus (try 'nmcli inspect --help')"


def test_python_dash_m_json_first(workdir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nmcli", "--json", "inspect", "MISSING"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and json.loads(proc.stdout)["error"]["code"] == 2

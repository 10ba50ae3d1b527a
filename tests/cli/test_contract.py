"""The contract every command keeps under bad input (issue 11): one JSON error object under
--json, exit 2 before any work for an unwritable output folder or a non-finite number, user
strings printed as typed (no rich markup), absurd input shapes refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.cli.options import check_number
from nmcli.commands.prune import run_prune
from nmcli.errors import InputError, OutputExistsError
from nmcli.inputs import parse_input_spec
from nmcli.io import check_output_path
from tests.conftest import py_source

runner = CliRunner()


@pytest.fixture()
def unwritable_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder no file can be created in, even by root: immutable (chattr +i), else mode 0555."""
    folder = tmp_path / "locked"
    folder.mkdir()
    chattr = shutil.which("chattr")
    immutable = (
        chattr is not None
        and subprocess.run([chattr, "+i", str(folder)], capture_output=True, check=False).returncode == 0
    )
    if not immutable:
        folder.chmod(0o555)
    try:
        probe = folder / "probe"
        try:
            probe.write_bytes(b"")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip("cannot make an unwritable folder here (root without CAP_LINUX_IMMUTABLE)")
        yield folder
    finally:
        if immutable and chattr is not None:
            subprocess.run([chattr, "-i", str(folder)], check=False)
        folder.chmod(0o755)


@pytest.fixture()
def mlp_ckpt(tmp_path: Path) -> Path:
    ckpt = tmp_path / "mlp-2of4.safetensors"
    run_prune(py_source("tiny_mlp"), input_shape="4x64", output=ckpt)
    return ckpt


# --- item 7: the JSON error object ------------------------------------------------------------


def test_json_failure_prints_one_error_object(tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect", str(tmp_path / "missing.safetensors"), "--json"])
    assert result.exit_code == 2
    out = json.loads(result.stdout)
    assert set(out) == {"error"}
    assert out["error"]["code"] == 2 and out["error"]["type"] == "SourceError"
    assert "missing.safetensors does not exist" in out["error"]["message"]


@pytest.mark.parametrize(
    ("args", "kind"),
    [
        (["inspect", "x.onnx", "--bogus", "--json"], "NoSuchOption"),
        (["export", "x.safetensors", "--atol", "nan", "--json"], "BadParameter"),
        (["inspect", "--json"], "MissingParameter"),
    ],
)
def test_json_usage_errors_are_error_objects_too(args: list[str], kind: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    out = json.loads(result.stdout)
    assert set(out) == {"error"} and out["error"]["code"] == 2 and out["error"]["type"] == kind
    assert out["error"]["message"]


def test_json_check_failure_keeps_the_report_as_the_one_object(mlp_ckpt: Path) -> None:
    result = runner.invoke(app, ["inspect", str(mlp_ckpt), "--pattern", "1:4", "--strict", "--json"])
    assert result.exit_code == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["compliant"] is False


# --- item 3: an unwritable output folder is exit 2 before the work ---------------------------


def test_check_output_path_refuses_an_unwritable_folder(unwritable_dir: Path) -> None:
    with pytest.raises(OutputExistsError, match="is not writable"):
        check_output_path(unwritable_dir / "x.safetensors", force=False)


@pytest.mark.parametrize("command", ["prune", "export"])
def test_unwritable_output_is_exit_2(command: str, unwritable_dir: Path, mlp_ckpt: Path) -> None:
    source = py_source("tiny_mlp") if command == "prune" else str(mlp_ckpt)
    out = unwritable_dir / ("x.safetensors" if command == "prune" else "x.onnx")
    result = runner.invoke(app, [command, source, "-o", str(out), "--input-shape", "4x64"])
    assert result.exit_code == 2, result.stderr
    assert "not writable" in result.stderr and "internal error" not in result.stderr
    assert os.listdir(unwritable_dir) == []


# --- item 4: user strings are printed as typed ---------------------------------------------------


def test_output_path_with_markup_characters(tmp_path: Path) -> None:
    weird = tmp_path / "a[" / "]b.safetensors"
    weird.parent.mkdir()
    result = runner.invoke(app, ["prune", py_source("tiny_mlp"), "-o", str(weird), "--input-shape", "4x64"])
    assert result.exit_code == 0, result.stderr
    assert weird.is_file()


def test_bold_tag_in_a_path_is_shown_as_typed(mlp_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "[bold]z.onnx"
    result = runner.invoke(app, ["export", str(mlp_ckpt), "-o", str(out), "--no-verify"])
    assert result.exit_code == 0, result.stderr
    assert "[bold]z.onnx" in result.stderr


# --- item 5: non-finite and absurd numbers --------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_check_number_refuses(value: float) -> None:
    import typer

    with pytest.raises(typer.BadParameter):
        check_number("--atol", value, minimum=0)
    assert check_number("--atol", 0.5, minimum=0) == 0.5


@pytest.mark.parametrize(
    "args", [["--atol", "nan"], ["--rtol", "inf"], ["--atol", "-1"], ["--workspace", "0"], ["--opset", "99"]]
)
def test_export_numbers_are_checked_before_work(mlp_ckpt: Path, args: list[str]) -> None:
    result = runner.invoke(app, ["export", str(mlp_ckpt), *args])
    assert result.exit_code == 2
    assert not mlp_ckpt.with_suffix(".onnx").exists()
    assert args[0] in result.stderr


def test_absurd_input_shape_is_refused_by_the_parser() -> None:
    with pytest.raises(InputError, match="2\\^31 - 1"):
        parse_input_spec("100000x3x100000x100000")
    assert parse_input_spec("1x3x224x224").tensors[0].shape == (1, 3, 224, 224)


def test_absurd_input_shape_on_export_is_exit_2(mlp_ckpt: Path) -> None:
    result = runner.invoke(app, ["export", str(mlp_ckpt), "--input-shape", "100000x3x100000x100000"])
    assert result.exit_code == 2 and "smaller --input-shape" in result.stderr

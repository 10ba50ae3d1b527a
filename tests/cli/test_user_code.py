"""User code cannot take over the process (issue 11, item 6), and loading errors are one clear
line (item 8): ``py:`` factories that exit, parse arguments or print; random bytes as model files."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nmcli.cli.app import app

runner = CliRunner()

_FACTORIES = """
import argparse
import sys

from torch import nn


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))


def exits_0():
    sys.exit(0)


def exits_3():
    sys.exit(3)


def parses_arguments():
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=16)
    parser.parse_args()
    return _model()


def prints():
    print("Loaded pretrained weights from somewhere")
    return _model()


def argv():
    return _model() if sys.argv == [sys.argv[0]] and sys.argv[0].startswith("py:") else None


def returns_int():
    return 7
"""


@pytest.fixture()
def factories(tmp_path: Path) -> Path:
    path = tmp_path / "factories.py"
    path.write_text(textwrap.dedent(_FACTORIES))
    return path


@pytest.mark.parametrize(("factory", "code"), [("exits_0", 0), ("exits_3", 3)])
def test_sys_exit_in_a_factory_is_exit_2_naming_it(factories: Path, factory: str, code: int) -> None:
    out = factories.parent / "out.safetensors"
    result = runner.invoke(app, ["prune", f"py:{factories}:{factory}", "-o", str(out), "--json"])
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert f"{factory}" in error["message"] and f"sys.exit({code})" in error["message"]
    assert not out.exists()


def test_argparse_in_a_factory_sees_no_nmcli_arguments(factories: Path) -> None:
    out = factories.parent / "out.safetensors"
    result = runner.invoke(app, ["prune", f"py:{factories}:parses_arguments", "-o", str(out), "--input-shape", "2x16"])
    assert result.exit_code == 0, result.stderr
    assert "usage:" not in result.stderr and out.is_file()


def test_sys_argv_is_the_spec(factories: Path) -> None:
    result = runner.invoke(app, ["inspect", f"py:{factories}:argv", "--json"])
    assert result.exit_code == 0, result.stderr + result.stdout


def test_what_a_factory_prints_goes_to_stderr(factories: Path) -> None:
    result = runner.invoke(app, ["inspect", f"py:{factories}:prints", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["layers"]  # stdout is exactly the one JSON object
    assert "Loaded pretrained weights" in result.stderr


def test_a_factory_returning_an_int(factories: Path) -> None:
    result = runner.invoke(app, ["inspect", f"py:{factories}:returns_int"])
    assert result.exit_code == 2 and "returned an int" in result.stderr


@pytest.mark.parametrize(
    ("name", "expected", "unwanted"),
    [
        ("rand.pt", "is not a torch", "weights_only"),
        ("rand.pt2", "not a torch.export program", "Traceback"),
    ],
)
def test_random_bytes_as_model_files_are_one_line(tmp_path: Path, name: str, expected: str, unwanted: str) -> None:
    path = tmp_path / name
    path.write_bytes(random.Random(1).randbytes(4096))
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and unwanted not in result.stderr


def test_empty_source_is_named_as_such() -> None:
    result = runner.invoke(app, ["inspect", ""])
    assert result.exit_code == 2
    assert "empty model source" in result.stderr and "directory" not in result.stderr

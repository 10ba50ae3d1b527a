"""The typer app: start-up without torch, --version, exit-code mapping, --debug."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from nmcli import __version__
from nmcli.cli.app import app, exit_code_for, guarded
from nmcli.errors import (
    BackendUnavailableError,
    CheckFailedError,
    CheckpointError,
    InputError,
    NmcliError,
    OutputExistsError,
    PatternError,
    SourceError,
    TrustRequiredError,
)

runner = CliRunner()

_PROBE = """
import sys
sys.argv = ["nmcli", *sys.argv[1:]]
from nmcli.cli.app import main
try:
    main()
except SystemExit:
    pass
print("TORCH-IMPORTED" if "torch" in sys.modules else "TORCH-NOT-IMPORTED")
"""


@pytest.mark.parametrize("argv", [["--help"], ["prune", "--help"], ["inspect", "--help"], ["--version"]])
def test_help_does_not_import_torch(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().endswith("TORCH-NOT-IMPORTED"), proc.stdout + proc.stderr


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("prune", "inspect"):
        assert command in result.stdout


def test_python_dash_m() -> None:
    proc = subprocess.run([sys.executable, "-m", "nmcli", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"nmcli {__version__}"


def test_console_script_help(nmcli_exe: str) -> None:
    proc = subprocess.run([nmcli_exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "prune" in proc.stdout and "inspect" in proc.stdout


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (CheckFailedError("x"), 1),
        (InputError("x"), 2),
        (PatternError("x"), 2),
        (SourceError("x"), 2),
        (TrustRequiredError("x"), 2),
        (CheckpointError("x"), 2),
        (OutputExistsError("x"), 2),
        (BackendUnavailableError("x"), 3),
        (NmcliError("x"), 4),
        (RuntimeError("x"), 4),
        (KeyError("x"), 4),
    ],
)
def test_exit_code_mapping(exc: BaseException, code: int) -> None:
    assert exit_code_for(exc) == code


def _app_raising(exc: Exception) -> typer.Typer:
    demo = typer.Typer()

    @demo.command()
    @guarded
    def boom() -> None:
        raise exc

    return demo


def test_internal_error_is_exit_4_with_a_hint() -> None:
    result = runner.invoke(_app_raising(ZeroDivisionError("division by zero")), [])
    assert result.exit_code == 4
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error: ZeroDivisionError: division by zero" in lines[0]
    assert "rerun with --debug" in lines[0] and "Traceback" not in result.stderr


def test_nmcli_error_message_is_one_line_even_if_multiline() -> None:
    result = runner.invoke(_app_raising(InputError("first\nsecond [bold]x[/bold]")), [])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["error: first second [bold]x[/bold]"]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--debug", "prune", str(tmp_path) + "/missing.pt"])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "does not exist" in result.stderr
    quiet = runner.invoke(app, ["prune", str(tmp_path) + "/missing.pt"])
    assert quiet.exit_code == 2 and "Traceback" not in quiet.stderr


def test_a_torchrun_worker_exits_with_the_commands_code_and_its_words(tmp_path: Path) -> None:
    """Under torchrun (WORLD_SIZE > 1) nmcli ends without interpreter finalization: the exit code,
    stdout and stderr must be those of the command."""
    env = {**os.environ, "WORLD_SIZE": "2", "NMCLI_PROGRESS": "off"}
    bad = subprocess.run([sys.executable, "-m", "nmcli", "inspect", str(tmp_path / "nope.safetensors")],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {tmp_path / 'nope.safetensors'} does not exist")
    good = subprocess.run([sys.executable, "-m", "nmcli", "--version"], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert good.returncode == 0 and good.stdout.strip()

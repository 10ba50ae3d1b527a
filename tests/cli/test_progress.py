"""Progress off a terminal (issue 23): plain lines per stage with the count and elapsed time; a
spinner (no ``0/?``) while a model loads; ``--quiet`` silences it; stdout stays clean for --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.progress import Progress
from typer.testing import CliRunner

from nmcli.cli.app import CountColumn, PlainProgress, app
from tests.conftest import py_source


def test_plain_lines_one_per_stage_and_every_ten_seconds() -> None:
    lines: list[str] = []
    clock = iter([0.0, 0.0, 0.5, 1.0, 2.0, 12.5, 13.0, 14.0])
    progress = PlainProgress("pruning", lines.append, clock=lambda: next(clock))
    progress(0, 0, "loading model.pt")  # stage: loading
    progress(1, 100, "a.weight")  # stage: the layers
    progress(2, 100, "b.weight")  # same stage, under 10 s: quiet
    progress(3, 100, "c.weight")
    progress(50, 100, "x.weight")  # 10 s since the last line
    progress(51, 100, "y.weight")
    progress(100, 100, "z.weight")  # finished
    assert lines == [
        "pruning: loading model.pt (0:00:00)",
        "pruning: 1/100 a.weight (0:00:00)",
        "pruning: 50/100 x.weight (0:00:12)",
        "pruning: 100/100 z.weight (0:00:14)",
    ]


def test_count_column_is_empty_while_loading() -> None:
    with Progress(transient=True) as progress:
        task = progress.add_task("pruning", total=None)
        assert str(CountColumn().render(progress.tasks[task])) == ""
        progress.update(task, completed=3, total=8)
        assert str(CountColumn().render(progress.tasks[task])) == "3/8"


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_logs_plain_progress_on_stderr_only(workdir: Path, monkeypatch: pytest.MonkeyPatch, quiet: bool) -> None:
    monkeypatch.setenv("NMCLI_PROGRESS", "auto")
    args = ["-q"] if quiet else []
    result = CliRunner().invoke(
        app, [*args, "prune", py_source("tiny_mlp"), "-p", "2:4", "-o", "m.safetensors", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["output"] == "m.safetensors"  # stdout: the JSON object only
    lines = [line for line in result.stderr.splitlines() if line.startswith("pruning:")]
    if quiet:
        assert lines == []
    else:
        assert lines[0].startswith("pruning: loading py:") and lines[-1].startswith("pruning: 3/3 ")
        assert all(line.endswith(")") for line in lines)

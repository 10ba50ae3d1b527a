"""The ``nmcli`` typer app: global options, command registration, and the one place that maps
errors to exit codes (DESIGN.md section 1).

Exit codes: 0 success; 1 the command found what it was asked to detect; 2 bad usage or input;
3 a needed optional backend or device is missing; 4 an internal error (a bug). No traceback is
shown unless ``--debug``. This module imports neither torch nor the core, so ``nmcli --help``
starts fast: each command imports what it needs when it runs.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console

from nmcli import __version__

COMMANDS = ("prune", "finetune", "sad", "export", "bench", "inspect")

# Off a terminal (CI logs, pipes) rich would wrap tables at 80 columns; logs read better wider.
_LOG_WIDTH = None if sys.stderr.isatty() or os.environ.get("COLUMNS") else 140
stderr = Console(stderr=True, highlight=False, soft_wrap=True, width=_LOG_WIDTH)
_state = {"debug": False}

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="nmcli",
    help="Prune PyTorch models to N:M structured sparsity (2:4 above all), recover them with SR-STE, "
    "measure mask drift (SAD), export to ONNX/TensorRT and benchmark dense vs sparse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nmcli {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    _state["debug"] = debug


def debug_enabled() -> bool:
    return _state["debug"]


def exit_code_for(exc: BaseException) -> int:
    """The process exit code for an exception (the one mapping of errors to codes)."""
    from nmcli.errors import NmcliError

    if isinstance(exc, NmcliError):
        return exc.exit_code
    return 4


def guarded(func: F) -> F:
    """Run a command body, turning errors into one red line on stderr and DESIGN.md's exit codes."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            stderr.print("[red]interrupted[/red]")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - this is the one place that maps every error
            from nmcli.errors import NmcliError

            code = exit_code_for(exc)
            if debug_enabled():
                stderr.print_exception(show_locals=False)
            if isinstance(exc, NmcliError):
                stderr.print(f"[red]error:[/red] {_one_line(str(exc))}", markup=True)
            else:
                stderr.print(
                    f"[red]internal error:[/red] {_one_line(f'{type(exc).__name__}: {exc}')} "
                    "(a bug in nmcli: rerun with --debug and report the traceback)",
                )
            raise typer.Exit(code) from None

    return wrapper  # type: ignore[return-value]


def _one_line(text: str) -> str:
    from rich.markup import escape

    return escape(" ".join(text.split()))


def emit_json(obj: Any) -> None:
    """Print exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def show_progress(json_output: bool) -> bool:
    """Progress bars only on a terminal and never in --json mode."""
    return not json_output and sys.stderr.isatty()


@contextmanager
def progress_bar(description: str, enabled: bool) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr; yields ``update(done, total, label="")``, a no-op when disabled."""
    if not enabled:
        yield lambda *a, **k: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[label]}"),
        console=stderr,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=None, label="")

        def update(done: int, total: int, label: str = "") -> None:
            progress.update(task, completed=done, total=total, label=label)

        yield update


def _register() -> None:
    # Each command module imports only typer, rich and this module at import time.
    for name in COMMANDS:
        module = importlib.import_module(f"nmcli.cli.{name}")
        app.command(name)(module.command)


_register()


def main() -> None:
    """Console-script entry point."""
    app(prog_name="nmcli")

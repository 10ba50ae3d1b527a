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
from rich.errors import MarkupError
from typer.core import TyperGroup

from nmcli import __version__

COMMANDS = ("prune", "finetune", "sad", "export", "bench", "inspect")


class _Console(Console):
    """The stderr console. Every user-provided string a command renders goes through :func:`esc`;
    should one slip through, a markup error prints the line as plain text instead of ending the
    command with an internal error after its work is done."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        try:
            super().print(*objects, **kwargs)
        except MarkupError:
            super().print(*objects, **{**kwargs, "markup": False})


def esc(value: object) -> str:
    """``str(value)`` with rich markup escaped: wrap every user-provided string (paths, specs,
    layer names, messages) in it before putting it into a line with markup, so ``-o '[bold]x'``
    prints as typed and ``-o 'a[/]b'`` cannot break rendering."""
    from rich.markup import escape

    return escape(str(value))


# Off a terminal (CI logs, pipes) rich would wrap tables at 80 columns; logs read better wider.
_LOG_WIDTH = None if sys.stderr.isatty() or os.environ.get("COLUMNS") else 140
stderr = _Console(stderr=True, highlight=False, soft_wrap=True, width=_LOG_WIDTH)
_state: dict[str, Any] = {"debug": False, "argv": [], "emitted": False}

F = TypeVar("F", bound=Callable[..., Any])

# click's ClickException, found through typer (which may vendor its own copy of click).
_ClickException: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def json_requested() -> bool:
    """Whether the command line being run asked for ``--json``."""
    return "--json" in _state["argv"]


def emit_error_json(code: int, kind: str, message: str) -> None:
    """The one JSON object of a failed ``--json`` run: ``{"error": {"code", "type", "message"}}``.

    Nothing is printed when the command already printed its object (e.g. an ``inspect --strict``
    report that exits 1): stdout holds exactly one object either way.
    """
    if not _state["emitted"]:
        emit_json({"error": {"code": code, "type": kind, "message": " ".join(message.split())}})


class _Group(TyperGroup):
    """The top-level command group: remembers the command line, and turns usage errors that
    click reports before a command runs (bad option values, unknown options) into the JSON error
    object under ``--json``."""

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        _state["argv"] = list(args) if args is not None else sys.argv[1:]
        _state["emitted"] = False
        return super().main(args, *rest, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _ClickException as exc:
            if json_requested():
                code = int(getattr(exc, "exit_code", 2))
                emit_error_json(code, type(exc).__name__, getattr(exc, "format_message", exc.__str__)())
            raise


app = typer.Typer(
    cls=_Group,
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
        json_mode = bool(kwargs.get("json_output"))
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            stderr.print("[red]interrupted[/red]")
            if json_mode:
                emit_error_json(130, "KeyboardInterrupt", "interrupted")
            raise typer.Exit(130) from None
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - this is the one place that maps every error
            from nmcli.errors import NmcliError

            code = exit_code_for(exc)
            if debug_enabled():
                stderr.print_exception(show_locals=False)
            if isinstance(exc, NmcliError):
                message = " ".join(str(exc).split())
                stderr.print(f"[red]error:[/red] {esc(message)}", markup=True)
            else:
                what = f"sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
                detail = f"{' '.join(what.split())} (a bug in nmcli: rerun with --debug and report the traceback)"
                message = f"internal error: {detail}"
                stderr.print(f"[red]internal error:[/red] {esc(detail)}")
            if json_mode:
                emit_error_json(code, type(exc).__name__, message)
            raise typer.Exit(code) from None

    return wrapper  # type: ignore[return-value]


def emit_json(obj: Any) -> None:
    """Print exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()
    _state["emitted"] = True


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

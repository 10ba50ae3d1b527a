"""The ``nmcli`` typer app: global options, command registration, and the one place that maps
errors to exit codes (DESIGN.md section 1).

Exit codes: 0 success; 1 the command found what it was asked to detect; 2 bad usage or input;
3 a needed optional backend or device is missing; 4 an internal error (a bug). No traceback is
shown unless ``--debug``. This module imports neither torch nor the core, so ``nmcli --help``
starts fast: each command imports what it needs when it runs.
"""

from __future__ import annotations

import errno
import functools
import importlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.errors import MarkupError
from rich.progress import ProgressColumn, Task
from rich.text import Text
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
_state: dict[str, Any] = {"debug": False, "quiet": False, "argv": [], "emitted": False}

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


def _json_last(args: list[str]) -> list[str]:
    """``args`` with a ``--json`` given before the command moved after it (``nmcli --json inspect X``
    is ``nmcli inspect X --json``); without a command it is dropped (the usage error still comes as JSON)."""
    head: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if not arg.startswith("-"):
            rest = args[i:]
            moved = [a for a in head if a != "--json"]
            return [*moved, *rest, "--json"] if len(moved) < len(head) and "--json" not in rest else [*moved, *rest]
        head.append(arg)
    if "--json" in head:
        return [a for a in args if a != "--json"]
    return args


def _usage_error(exc: Exception) -> Exception:
    """Report a click usage error as one red line on stderr (and the JSON error object under
    ``--json``) instead of click's boxed block; returns the exception to raise."""
    code = int(getattr(exc, "exit_code", 2))
    message = " ".join(str(getattr(exc, "format_message", exc.__str__)()).split())
    if type(exc).__name__ == "NoArgsIsHelpError":  # bare ``nmcli``: click prints the help
        return exc
    ctx = getattr(exc, "ctx", None)
    hint = ""
    if ctx is not None and getattr(ctx, "command_path", None):
        hint = f" (try '{ctx.command_path} --help')"
    if json_requested():
        emit_error_json(code, type(exc).__name__, message)
    stderr.print(f"[red]error:[/red] {esc(message)}{esc(hint)}", markup=True)
    return typer.Exit(code)


class _Group(TyperGroup):
    """The top-level command group: remembers the command line, takes ``--json`` before the command
    too, and reports usage errors that click raises before a command runs (bad option values,
    unknown options, missing arguments, no such command) as one red line, and under ``--json`` as
    the JSON error object."""

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        argv = list(args) if args is not None else sys.argv[1:]
        _state["argv"] = argv
        _state["emitted"] = False
        args = _json_last(argv)
        if not args and json_requested():  # ``nmcli --json``: no help text on stdout, the JSON error
            message = f"missing command: give one of {', '.join(COMMANDS)}"
            emit_error_json(2, "UsageError", message)
            stderr.print(f"[red]error:[/red] {message} (try 'nmcli --help')")
            sys.exit(2)
        return super().main(args, *rest, **kwargs)

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except _ClickException as exc:
            raise _usage_error(exc) from None

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _ClickException as exc:
            raise _usage_error(exc) from None
        except KeyboardInterrupt as exc:  # a signal outside a command body (guarded handles those inside)
            code = 128 + int(getattr(exc, "signum", signal.SIGINT))
            if json_requested():
                emit_error_json(code, type(exc).__name__, "interrupted")
            raise typer.Exit(code) from None


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
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress on stderr (neither the bar nor the plain lines of logs)."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    _state["debug"] = debug
    _state["quiet"] = quiet


def debug_enabled() -> bool:
    return _state["debug"]


def exit_code_for(exc: BaseException) -> int:
    """The process exit code for an exception (the one mapping of errors to codes)."""
    from nmcli.errors import NmcliError

    if isinstance(exc, NmcliError):
        return exc.exit_code
    return 4


def _os_error_line(exc: BaseException) -> str | None:
    """One line for an OS error that escaped the core's output checks (a backstop: the core raises
    ``OutputWriteError`` itself): no space, quota, name too long, permission, read-only, I/O error."""
    from nmcli.io import WRITE_ERRNOS, os_reason, write_errno

    if not isinstance(exc, OSError) or exc.errno is None or exc.errno not in WRITE_ERRNOS:
        return None
    where = exc.filename2 or exc.filename
    verb = "write" if write_errno(exc) is not None and where is None else "access"
    if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)):
        verb = "write"
    what = f"cannot {verb} {os.fsdecode(where)}" if where is not None else f"cannot {verb} the output"
    return f"{what}: {os_reason(exc.errno)}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def guarded(func: F) -> F:
    """Run a command body, turning errors into one red line on stderr and DESIGN.md's exit codes.

    KeyboardInterrupt (Ctrl-C) exits 130; SIGTERM and SIGHUP, turned into
    :class:`~nmcli.errors.Interrupted` by :func:`install_signal_handlers`, exit 128 + the signal.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        json_mode = bool(kwargs.get("json_output")) or json_requested()
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt as exc:
            signum = int(getattr(exc, "signum", signal.SIGINT))
            what = "interrupted" if signum == signal.SIGINT else f"interrupted by {_signal_name(signum)}"
            stderr.print(f"[red]{what}[/red]")
            if json_mode:
                emit_error_json(128 + signum, type(exc).__name__, what)
            raise typer.Exit(128 + signum) from None
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - this is the one place that maps every error
            from nmcli.errors import NmcliError

            code = exit_code_for(exc)
            if debug_enabled():
                stderr.print_exception(show_locals=False)
            os_line = _os_error_line(exc)
            if os_line is not None:
                code, message = 2, os_line
                stderr.print(f"[red]error:[/red] {esc(message)}", markup=True)
            elif isinstance(exc, NmcliError):
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
    """Progress bars only on a terminal, never in --json mode or with --quiet (off a terminal,
    :func:`progress_bar` writes plain lines instead)."""
    return not json_output and sys.stderr.isatty() and _progress_mode() != "off"


PLAIN_EVERY_S = 10.0  # off a terminal: a line at least this often while a stage runs
_FEW_STEPS = 8  # up to this many steps, each step is a stage of its own (a line each)


def _progress_mode() -> str:
    """``off`` with ``--quiet`` or ``NMCLI_PROGRESS=off`` (the test suite sets it), else ``auto``."""
    if _state.get("quiet") or os.environ.get("NMCLI_PROGRESS", "").lower() in ("off", "0", "none"):
        return "off"
    return "auto"


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class PlainProgress:
    """Progress for logs (stderr not a terminal): one plain line per stage and at least every
    :data:`PLAIN_EVERY_S` seconds while it runs, with the count and the elapsed time, e.g.
    ``pruning: 12/96 fc1.weight (0:00:23)``. A stage is a change of ``total`` (loading, then the
    layers), or of the label when there are few steps (export's ``exporting ONNX``, ``verifying``).
    """

    def __init__(
        self,
        description: str,
        write: Callable[[str], None],
        every: float = PLAIN_EVERY_S,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.description, self.write, self.every = description, write, every
        self._clock = clock or time.monotonic
        self.start = self._clock()
        self.last: float | None = None
        self.total: int | None = None
        self.label: str | None = None

    def __call__(self, done: int, total: int, label: str = "") -> None:
        now = self._clock()
        new_stage = total != self.total or (label != self.label and total <= _FEW_STEPS)
        finished = total > 0 and done >= total and not new_stage
        if not (new_stage or finished or self.last is None or now - self.last >= self.every):
            return
        self.total, self.label, self.last = total, label, now
        count = f"{done}/{total} " if total > 0 else ""
        self.write(f"{self.description}: {count}{label} ({_elapsed(now - self.start)})".replace("  ", " "))


class CountColumn(ProgressColumn):
    """Rich column: ``done/total``, or nothing while the total is unknown (a spinner and the label show)."""

    def render(self, task: Task) -> Text:
        return Text(f"{int(task.completed)}/{int(task.total)}" if task.total else "")


def plain_progress(description: str) -> PlainProgress | None:
    """:class:`PlainProgress` lines on stderr when it is not a terminal (a log), else None; None with ``--quiet``."""
    if sys.stderr.isatty() or _progress_mode() == "off":
        return None
    return PlainProgress(description, lambda line: stderr.print(line, markup=False, highlight=False))


@contextmanager
def progress_bar(description: str, enabled: bool) -> Iterator[Callable[..., None]]:
    """Progress on stderr; yields ``update(done, total, label="")``. On a terminal (``enabled``, see
    :func:`show_progress`) a rich bar, with a spinner and the label while ``total`` is 0 (loading a
    model); off a terminal plain :class:`PlainProgress` lines; nothing with ``--quiet`` or when
    ``enabled`` is off on a terminal (``--json``)."""
    if not enabled:
        yield plain_progress(description) or (lambda *a, **k: None)
        return
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        CountColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[label]}"),
        console=stderr,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=None, label="")

        def update(done: int, total: int, label: str = "") -> None:
            progress.update(task, completed=done, total=total if total > 0 else None, label=label)

        yield update


def _register() -> None:
    # Each command module imports only typer, rich and this module at import time.
    for name in COMMANDS:
        module = importlib.import_module(f"nmcli.cli.{name}")
        app.command(name)(module.command)


_register()


def _raise_interrupted(signum: int, frame: Any) -> None:
    from nmcli.errors import Interrupted

    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """Handle SIGTERM and SIGHUP like Ctrl-C: raise :class:`~nmcli.errors.Interrupted` in the main
    thread, so temporary files are removed and finetune saves its resumable state; the command
    exits 128 + the signal. Only the CLI process's main thread installs them (never at import)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _raise_interrupted)


def main() -> None:
    """Console-script entry point."""
    # MKL's conditional numerical reproducibility, before torch loads MKL: products whose low bits do not
    # depend on memory alignment, so the same command gives the same masks run to run (DESIGN.md 3b)
    os.environ.setdefault("MKL_CBWR", "AUTO")
    install_signal_handlers()
    if int(os.environ.get("WORLD_SIZE", "1") or "1") <= 1:
        app(prog_name="nmcli")
        return
    # A torchrun worker ends without interpreter finalization: gloo's worker threads may still be
    # freeing a finished collective's work, and taking the GIL while Python tears down aborts the
    # process ("terminate called without an active exception"). The command has written its output
    # (atomically) and its exit code is known; only the streams need flushing.
    try:
        app(prog_name="nmcli")
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

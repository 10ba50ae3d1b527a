"""The typer options the commands share, in one place, and number options checked at parse time.

An option that several commands take with the same meaning is one ``Annotated`` alias here, used
as ``json_output: JsonOption = False``; an option of one command only is an alias in that
command's module.

Every numeric option of every command is made by :func:`number_option` (or takes its
``callback`` from :func:`number`), so ``nan``, ``inf`` and absurd sizes are refused before any
work starts (DESIGN.md section 1)::

    AtolOption = Annotated[float | None, number_option("--atol", help="...", minimum=0, maximum=1e6)]

The check itself is :func:`check_number`, which raises ``typer.BadParameter`` (click reports it as
a usage error, exit 2, and under ``--json`` as the JSON error object).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

N = TypeVar("N", int, float)


def _fmt(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_number(
    option: str,
    value: N | None,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive: bool = False,
) -> N | None:
    """``value`` when it is finite and within ``[minimum, maximum]`` (``(minimum, maximum]`` with
    ``exclusive``); None passes through.

    Raises:
        typer.BadParameter: ``value`` is NaN, infinite or out of range; the message names ``option``,
            the value and the accepted range.
    """
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        raise typer.BadParameter(
            f"{value} is not a finite number: give one{_range_text(minimum, maximum, exclusive)}", param_hint=option
        )
    low_bad = minimum is not None and (value <= minimum if exclusive else value < minimum)
    high_bad = maximum is not None and value > maximum
    if low_bad or high_bad:
        raise typer.BadParameter(
            f"{_fmt(value)} is out of range: give a number{_range_text(minimum, maximum, exclusive)}", param_hint=option
        )
    return value


def _range_text(minimum: float | None, maximum: float | None, exclusive: bool) -> str:
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if exclusive else '>='} {_fmt(minimum)}")
    if maximum is not None:
        parts.append(f"<= {_fmt(maximum)}")
    return (" " + " and ".join(parts)) if parts else ""


def number(
    option: str, *, minimum: float | None = None, maximum: float | None = None, exclusive: bool = False
) -> Callable[[Any], Any]:
    """A typer ``callback`` that applies :func:`check_number` to the option's value."""

    def callback(value: Any) -> Any:
        return check_number(option, value, minimum=minimum, maximum=maximum, exclusive=exclusive)

    return callback


def number_option(
    *decls: str,
    help: str,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive: bool = False,
) -> Any:
    """A ``typer.Option`` named ``decls`` whose value :func:`check_number` checks (named by the last decl)."""
    check = number(decls[-1], minimum=minimum, maximum=maximum, exclusive=exclusive)
    return typer.Option(*decls, help=help, callback=check)


TRUST_HELP = (
    "Run code a file holds: a pickled nn.Module, or a checkpoint's recorded py:/pickled source "
    "(only for authors you trust)."
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]
TrustOption = Annotated[bool, typer.Option("--trust", help=TRUST_HELP)]
ArchOption = Annotated[
    str | None,
    typer.Option("--arch", help="Architecture source for a plain state dict, or to override a checkpoint's source."),
]
ModelClassOption = Annotated[
    str,
    typer.Option(
        "--model-class",
        help="Transformers class of the hf: sources the command builds (model, --arch, --teacher): auto "
        "(config's class when the files hold its weights, else the base model), base (AutoModel) or a class "
        "name such as BertModel. A checkpoint is rebuilt with the class it records: another one is an error, "
        "unless given with --arch hf:DIR.",
    ),
]
InputShapeOption = Annotated[
    str | None,
    typer.Option("--input-shape", help="Input spec, e.g. 1x3x224x224 (default: the one stored in the checkpoint)."),
]
DATA_SPECS = "tensors:FILE.safetensors, text:FILE.txt, imagefolder:DIR or py:module:callable"

__all__ = [
    "DATA_SPECS",
    "ArchOption",
    "ForceOption",
    "InputShapeOption",
    "JsonOption",
    "ModelClassOption",
    "TrustOption",
    "check_number",
    "number",
    "number_option",
]

"""Number options checked at parse time: finite and in range, or exit 2 naming the option.

Every numeric option of every command takes its ``callback`` from :func:`number`, so ``nan``,
``inf`` and absurd sizes are refused before any work starts (DESIGN.md section 1)::

    atol: float | None = typer.Option(None, "--atol", callback=number("--atol", minimum=0))
    epochs: float | None = typer.Option(None, "--epochs", callback=number("--epochs", minimum=0, exclusive=True,
                                                                           maximum=1e6))

The check itself is :func:`check_number`, which raises ``typer.BadParameter`` (click reports it as
a usage error, exit 2, and under ``--json`` as the JSON error object).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

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


__all__ = ["check_number", "number"]

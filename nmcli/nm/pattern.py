"""N:M patterns: parsing and the notes users see about them (DESIGN.md section 3)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from nmcli.errors import PatternError

MAX_M = 32
_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """An N:M pattern: at most ``n`` non-zeros in every group of ``m`` consecutive weights."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (0 < self.n < self.m <= MAX_M):
            raise PatternError(
                f"pattern {self.n}:{self.m} is not supported: use N:M with 0 < N < M <= {MAX_M}, e.g. 2:4"
            )

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def slug(self) -> str:
        """File-name form, e.g. ``2of4``."""
        return f"{self.n}of{self.m}"

    @property
    def accelerated(self) -> bool:
        """Whether NVIDIA sparse tensor cores (Ampere and later) accelerate this pattern."""
        return self.n == 2 and self.m == 4

    @property
    def density(self) -> float:
        return self.n / self.m


TENSOR_CORE_PATTERN = Pattern(2, 4)


def parse_pattern(text: str | Pattern) -> Pattern:
    """Parse ``"N:M"`` (e.g. ``"2:4"``) into a :class:`Pattern`.

    Raises:
        PatternError: the text is not of the form N:M with 0 < N < M <= 32.
    """
    if isinstance(text, Pattern):
        return text
    match = _PATTERN_RE.match(str(text))
    if not match:
        raise PatternError(f"malformed pattern {text!r}: write it as N:M, e.g. 2:4 or 1:4")
    return Pattern(int(match.group(1)), int(match.group(2)))


def pattern_note(pattern: Pattern) -> str | None:
    """A one-line note for patterns that sparse tensor cores do not accelerate, else None."""
    if pattern.accelerated:
        return None
    return (
        f"{pattern} sparsity is not accelerated by NVIDIA sparse tensor cores (only 2:4 is); "
        "it reduces parameters but not latency"
    )

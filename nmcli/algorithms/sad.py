"""SAD (Sparse Architecture Divergence, DESIGN.md section 5) between masks held in memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LayerSad:
    """SAD of one layer pruned in both inputs: ``sad`` differing connections out of ``total`` weights."""

    param: str
    sad: int
    total: int

    @property
    def normalized(self) -> float:
        return self.sad / self.total if self.total else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"param": self.param, "sad": self.sad, "total": self.total, "normalized": self.normalized}


@dataclass(frozen=True)
class OneSidedLayer:
    """A layer pruned in only one input of a pair (``pruned_in`` is ``"a"`` or ``"b"``).

    It is not part of the SAD sum (SAD runs over layers pruned in both) but is always reported;
    ``pruned`` is how many of its ``total`` weights the one mask prunes, i.e. its SAD against a
    dense (all-kept) layer.
    """

    param: str
    pruned_in: str
    total: int
    pruned: int

    def to_json(self) -> dict[str, Any]:
        return {"param": self.param, "pruned_in": self.pruned_in, "total": self.total, "pruned": self.pruned}


@dataclass
class SadResult:
    """SAD between two inputs ``a`` and ``b``, overall and per layer (in model order)."""

    layers: list[LayerSad] = field(default_factory=list)
    one_sided: list[OneSidedLayer] = field(default_factory=list)
    a: str | None = None
    b: str | None = None

    @property
    def sad(self) -> int:
        return sum(layer.sad for layer in self.layers)

    @property
    def total(self) -> int:
        return sum(layer.total for layer in self.layers)

    @property
    def normalized(self) -> float:
        return self.sad / self.total if self.total else 0.0

    def by_divergence(self) -> list[LayerSad]:
        """Layers sorted by normalized SAD, then count, most divergent first."""
        return sorted(self.layers, key=lambda x: (-x.normalized, -x.sad, x.param))

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "sad": self.sad,
            "total": self.total,
            "normalized": self.normalized,
            "layers": [x.to_json() for x in self.layers],
            "one_sided": [x.to_json() for x in self.one_sided],
        }

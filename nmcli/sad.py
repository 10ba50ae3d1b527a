"""SAD, Sparse Architecture Divergence (DESIGN.md section 5; Zhou et al., ICLR 2021).

``SAD = sum over pruned layers l of ||M_l(a) XOR M_l(b)||_0``: the number of connections whose
kept/pruned state differs between two sparse networks. The comparison works on bit-packed masks
(XOR then popcount), never unpacking them to floats. This is the one implementation of SAD:
``nmcli sad`` and ``finetune``'s SAD-vs-start figure both use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nmcli.checkpoint import pack_mask


def packed_xor_count(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> int:
    """Number of differing bits between two packed masks of the same length."""
    left = a.numpy() if isinstance(a, torch.Tensor) else a
    right = b.numpy() if isinstance(b, torch.Tensor) else b
    return int(np.bitwise_count(np.bitwise_xor(left, right)).sum(dtype=np.int64))


@dataclass(frozen=True)
class LayerSad:
    param: str
    sad: int
    total: int

    @property
    def normalized(self) -> float:
        return self.sad / self.total if self.total else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"param": self.param, "sad": self.sad, "total": self.total, "normalized": self.normalized}


@dataclass
class SadResult:
    """SAD overall and per layer."""

    layers: list[LayerSad] = field(default_factory=list)

    @property
    def sad(self) -> int:
        return sum(layer.sad for layer in self.layers)

    @property
    def total(self) -> int:
        return sum(layer.total for layer in self.layers)

    @property
    def normalized(self) -> float:
        return self.sad / self.total if self.total else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "sad": self.sad,
            "total": self.total,
            "normalized": self.normalized,
            "layers": [x.to_json() for x in self.layers],
        }


def layer_sad(param: str, mask_a: torch.Tensor, mask_b: torch.Tensor) -> LayerSad:
    """SAD of one layer from two boolean masks, or two packed uint8 masks with ``total`` from the bools."""
    if mask_a.dtype == torch.bool:
        total = mask_a.numel()
        return LayerSad(param, packed_xor_count(pack_mask(mask_a), pack_mask(mask_b)), total)
    raise TypeError("layer_sad takes boolean masks; use packed_xor_count for packed ones")


def compare_masks(masks_a: Mapping[str, torch.Tensor], masks_b: Mapping[str, torch.Tensor]) -> SadResult:
    """SAD between two sets of boolean masks over the parameters they share, in ``masks_a`` order."""
    return SadResult([layer_sad(p, masks_a[p], masks_b[p]) for p in masks_a if p in masks_b])

"""N:M checks on raw tensor bits and packed masks, without torch (numpy only).

``inspect`` and ``sad`` of checkpoints read weights and packed masks as bits; these helpers count
non-zeros per group, pack and unpack masks, and compare packed masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from nmcli.errors import PatternError

if TYPE_CHECKING:  # torch is imported where it is used: parsing patterns and reading headers stay torch-free
    import torch
import math
from typing import TYPE_CHECKING

from nmcli.nm.pattern import Pattern

if TYPE_CHECKING:  # torch is imported where tensors are made: headers and packed masks read without it
    import torch
if TYPE_CHECKING:
    import torch

    from nmcli.nm.pattern import Pattern
from nmcli.errors import (
    MismatchError,
)
from nmcli.nm.pattern import TENSOR_CORE_PATTERN, Pattern

if TYPE_CHECKING:
    import torch


# float dtype name -> (sign bit, bits that are all set in NaN and infinity and only there)
FLOAT_BITS: dict[str, tuple[int, int]] = {
    "float64": (1 << 63, 0x7FF0_0000_0000_0000),
    "float32": (1 << 31, 0x7F80_0000),
    "float16": (1 << 15, 0x7C00),
    "bfloat16": (1 << 15, 0x7F80),
    "float8_e5m2": (1 << 7, 0x7C),
    "float8_e4m3fn": (1 << 7, 0x7F),  # no infinity; NaN is S.1111.111
}
_UNSIGNED = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


@dataclass(frozen=True)
class TensorBits:
    """A tensor's elements as unsigned integers of the same size (``bits``), with its dtype name.

    ``dtype`` is torch's name without ``torch.`` (``float32``, ``bfloat16``, ``uint8``, ``bool``).
    """

    dtype: str
    bits: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.bits.shape)

    @property
    def floating(self) -> bool:
        return self.dtype in FLOAT_BITS

    @property
    def size(self) -> int:
        return int(self.bits.size)

    @classmethod
    def of_tensor(cls, tensor: torch.Tensor) -> TensorBits:
        """The bits of a torch tensor (copied to the CPU and made contiguous only when needed)."""
        import torch

        value = tensor.detach().to("cpu").contiguous()
        dtype = str(value.dtype).removeprefix("torch.")
        flat = value.reshape(-1).view(torch.uint8).numpy()
        return cls(dtype, flat.view(np.dtype(_UNSIGNED[value.element_size()])).reshape(tuple(value.shape)))

    def stored_nonzero(self) -> np.ndarray:
        """Elements that are not exactly ``+0.0`` (``-0.0`` counts as non-zero), like :func:`stored_nonzero`."""
        return self.bits != 0

    def nonzero(self) -> np.ndarray:
        """Elements that are not zero, ``-0.0`` counting as zero."""
        if self.floating:
            return (self.bits & self.bits.dtype.type(~FLOAT_BITS[self.dtype][0] & _ones(self.bits))) != 0
        return self.bits != 0

    def negative_zeros(self) -> int:
        """How many elements are ``-0.0`` (0 for integer tensors)."""
        if not self.floating:
            return 0
        return int(np.count_nonzero(self.bits == self.bits.dtype.type(FLOAT_BITS[self.dtype][0])))

    def nonfinite(self) -> bool:
        """Whether a floating tensor holds a NaN or an infinity (checked in slices of 16M elements)."""
        if not self.floating:
            return False
        special = self.bits.dtype.type(FLOAT_BITS[self.dtype][1])
        flat = self.bits.reshape(-1)
        step = 1 << 24
        return any(bool(((flat[i : i + step] & special) == special).any()) for i in range(0, flat.size, step))


def _ones(bits: np.ndarray) -> int:
    return (1 << (8 * bits.dtype.itemsize)) - 1


def array_group_counts(flags: np.ndarray, m: int, axis: int) -> np.ndarray:
    """Number of true ``flags`` in every group of ``m`` along ``axis`` (numpy), shape ``[..., G]``.

    Raises:
        PatternError: the axis does not hold groups of ``m``.
    """
    axis = axis % flags.ndim
    if flags.shape[axis] % m:
        raise PatternError(
            f"dimension {axis} of a {tuple(flags.shape)} tensor has size {flags.shape[axis]}, not a multiple of M={m}"
        )
    moved = np.moveaxis(flags, axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m).sum(axis=-1, dtype=np.int32)


@dataclass(frozen=True)
class BitsCompliance:
    """N:M state of one weight: ``sparsity`` (share of zeros, ``-0.0`` included), ``compliant``
    (every group of ``m`` along the axis has at most ``n`` non-zeros, ``-0.0`` counting as zero),
    ``compliant_24`` (the same for 2:4) and ``negative_zeros``."""

    sparsity: float
    compliant: bool
    compliant_24: bool
    negative_zeros: int


def bits_compliance(values: TensorBits, pattern: Pattern, axis: int) -> BitsCompliance:
    """Sparsity and N:M (and 2:4) compliance of a weight along ``axis``; ``-0.0`` counts as zero.

    ``-0.0`` is what folding a negative BatchNorm scale into a pruned weight gives, and Polygraphy
    and TensorRT count it as zero; it is reported in ``negative_zeros`` (sparse compressors that
    compare bit patterns count it as non-zero).
    """
    nonzero = values.nonzero()
    sparsity = 1.0 - int(np.count_nonzero(nonzero)) / values.size if values.size else 0.0

    def holds(p: Pattern) -> bool:
        if nonzero.ndim == 0 or nonzero.shape[axis] % p.m:
            return False
        return bool((array_group_counts(nonzero, p.m, axis) <= p.n).all())

    compliant = holds(pattern)
    compliant_24 = compliant if pattern == TENSOR_CORE_PATTERN else holds(TENSOR_CORE_PATTERN)
    return BitsCompliance(sparsity, compliant, compliant_24, values.negative_zeros())


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a boolean mask: ``numpy.packbits(mask.reshape(-1), bitorder="little")`` as a uint8 tensor."""
    import torch

    flat = mask.detach().to("cpu", torch.bool).reshape(-1).numpy()
    return torch.from_numpy(np.packbits(flat, bitorder="little"))


def unpack_mask(packed: torch.Tensor | np.ndarray, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a boolean tensor of ``shape``."""
    import torch

    array = packed if isinstance(packed, np.ndarray) else packed.numpy()
    count = math.prod(shape)
    bits = np.unpackbits(array.astype(np.uint8, copy=False), count=count, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))


def packed_size(shape: Sequence[int]) -> int:
    """Bytes of a packed mask for a parameter of ``shape``."""
    return (math.prod(shape) + 7) // 8


_LUTS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _byte_tables(m: int) -> tuple[np.ndarray, np.ndarray]:
    """Per byte value: its popcount, and the largest popcount of its groups of ``m`` bits (``m`` divides 8)."""
    if m not in _LUTS:
        values = np.arange(256, dtype=np.uint16)
        bits = ((values[:, None] >> np.arange(8)) & 1).astype(np.uint8)
        _LUTS[m] = (bits.sum(1).astype(np.uint8), bits.reshape(256, 8 // m, m).sum(2).max(1).astype(np.uint8))
    return _LUTS[m]


_EXACT: dict[tuple[int, int], np.ndarray] = {}


def exactly_n(packed: np.ndarray, shape: Sequence[int], axis: int, n: int, m: int) -> bool:
    """Whether a packed mask keeps exactly ``n`` of every group of ``m`` along ``axis`` (one table lookup per byte)."""
    if not (axis == len(shape) - 1 and 8 % m == 0 and int(shape[-1]) % 8 == 0):
        kept, compliant = packed_mask_stats(packed, shape, axis, n, m)
        return compliant and kept * m == n * int(np.prod(shape))
    if (n, m) not in _EXACT:
        popcount, _ = _byte_tables(m)
        values = np.arange(256)
        groups = [(values >> (m * g)) & ((1 << m) - 1) for g in range(8 // m)]
        _EXACT[n, m] = np.logical_and.reduce([popcount[v] == n for v in groups])
    return bool(_EXACT[n, m][np.asarray(packed, dtype=np.uint8)].all())


def packed_mask_stats(packed: np.ndarray, shape: Sequence[int], axis: int, n: int, m: int) -> tuple[int, bool]:
    """``(kept, compliant)`` of a packed mask (``pack_mask`` layout): how many weights it keeps, and
    whether every group of ``m`` along ``axis`` keeps at most ``n``. Numpy only.

    Along the last axis with ``m`` dividing 8 and rows of whole bytes, groups never straddle a byte:
    two table lookups per byte. Other layouts are unpacked.
    """
    count = 1
    for d in shape:
        count *= int(d)
    data = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if axis == len(shape) - 1 and 8 % m == 0 and int(shape[-1]) % 8 == 0:
        popcount, group_max = _byte_tables(m)
        kept = int(popcount[data].sum(dtype=np.int64))
        return kept, not bool((group_max[data] > n).any())
    mask = np.unpackbits(data, count=count, bitorder="little").reshape(tuple(shape))
    moved = np.moveaxis(mask, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m).sum(-1) if moved.shape[-1] % m == 0 else None
    return int(mask.sum(dtype=np.int64)), groups is not None and not bool((groups > n).any())


def _as_uint8(a: np.ndarray | torch.Tensor) -> np.ndarray:
    array = a if isinstance(a, np.ndarray) else a.detach().cpu().numpy()
    return np.ascontiguousarray(array).reshape(-1)


def _popcount(array: np.ndarray) -> int:
    """Set bits in a 1-D uint8 array (8 bytes at a time where possible)."""
    whole = array.size // 8 * 8
    count = 0
    if whole:
        count += int(np.bitwise_count(array[:whole].view(np.uint64)).sum(dtype=np.int64))
    if whole < array.size:
        count += int(np.bitwise_count(array[whole:]).sum(dtype=np.int64))
    return count


def packed_xor_count(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> int:
    """Number of differing bits between two packed masks of the same length.

    Raises:
        MismatchError: the two packed masks have different lengths.
    """
    left, right = _as_uint8(a), _as_uint8(b)
    if left.shape != right.shape:
        raise MismatchError(f"packed masks of {left.size} and {right.size} bytes cannot be compared")
    return _popcount(np.bitwise_xor(left, right))


def packed_popcount(packed: np.ndarray | torch.Tensor) -> int:
    """Number of kept weights (set bits) in a packed mask."""
    return _popcount(_as_uint8(packed))

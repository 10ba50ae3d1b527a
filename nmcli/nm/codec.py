"""The compressed N:M codec: a pruned weight as its kept values plus in-group indices (numpy only).

A pruned weight keeps only ``n`` of every ``m`` values, so it can be stored as its kept values
plus the position of each inside its group: for 2:4 that is half the values and a 2-bit index per
kept value -- the "sparse-24" content that cuSPARSELt and compressed-tensors store.

This module is the codec only: arrays in, arrays out, no file and no torch. It sits *below*
:mod:`nmcli.formats.checkpoint`, which owns the file (``nmcli export --compress`` writes it with
:func:`nmcli.formats.open.compress_checkpoint`; :class:`nmcli.formats.checkpoint.CheckpointReader` recognises
it by its format tag and decodes it transparently through this codec, so ``inspect``, ``sad``,
``export`` and every other command read back exactly the same effective weights, masks and
metadata, ``inspect`` and ``sad`` without torch). This module never imports the checkpoint module.

The codec works on any element type: weights are usually given as their raw bits (unsigned
integers of the same size, :class:`nmcli.nm.bits.TensorBits`), so float16, bfloat16 and float8
round-trip bit-exactly, and the padding value is the all-zero pattern, ``+0.0``.

File layout (``__metadata__["format"] == "nmcli/1+compressed"``, ``"nmcli"`` is the usual JSON):

* every tensor that is not a pruned weight: stored as is, under its own name (biases, norms,
  embeddings, unpruned layers; ``__nmcli__/dense/<param>`` dense weights when present);
* for each pruned parameter ``P`` with layer entry ``(n, m, axis, shape)``, let
  ``W2 = W.movedim(axis, -1).reshape(R, K)`` (``K`` = the input size, ``G = K / m`` groups per row):

  - ``__nmcli__/nm/values/P``: ``W``'s dtype, shape ``[R, G * n]``: each group's kept values in
    increasing in-group index order;
  - ``__nmcli__/nm/indices/P``: 1-D ``uint8``: the in-group index (``0 .. m-1``) of every kept value,
    ``b = ceil(log2(m))`` bits each (2 bits for 2:4), in the row-major order of ``[R, G, n]``,
    written as one little-endian bit stream (value ``i`` occupies stream bits ``i*b .. i*b+b-1``,
    least significant first; stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``). For 2:4 one
    byte holds two groups: bits 0-1 and 2-3 the first group's two indices, bits 4-7 the next's;
  - ``__nmcli__/mask/P``: the usual bit-packed mask, stored only when some group keeps fewer than
    ``n`` values (its index slots are then padded with the lowest pruned positions, value ``+0.0``);
    otherwise the mask is exactly the positions the indices name.

For 2:4 in fp16 a weight takes ``K`` bytes of values plus ``K / 8`` of indices per row instead of
``2K`` bytes dense plus the ``K / 8`` bytes of the packed mask: about 56% of the nmcli/1 size.
The byte layout is nmcli's own (not cuSPARSELt's hardware-reordered metadata), chosen to be
simple to read from any language.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from nmcli.errors import CheckpointError

VALUES_PREFIX = "__nmcli__/nm/values/"
INDICES_PREFIX = "__nmcli__/nm/indices/"
CHUNK_ELEMENTS = 1 << 20  # weights encoded per step of compress_weight (bounds its temporaries)


class NMLayout(Protocol):
    """What the codec needs to know of a pruned weight (a :class:`nmcli.formats.checkpoint.LayerEntry` is one)."""

    @property
    def param(self) -> str: ...

    @property
    def n(self) -> int: ...

    @property
    def m(self) -> int: ...

    @property
    def axis(self) -> int: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


def index_bits(m: int) -> int:
    """Bits per in-group index for groups of ``m`` (2 for 2:4, 3 for 4:8)."""
    return max(1, math.ceil(math.log2(m)))


def _rows(array: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(array, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def _unrows(rows: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    moved_shape = [*shape[:axis], *shape[axis + 1 :], shape[axis]]
    return np.ascontiguousarray(np.moveaxis(rows.reshape(moved_shape), -1, axis))


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """Pack small unsigned integers into a little-endian bit stream of ``bits`` bits each."""
    flat = indices.astype(np.uint8, copy=False).reshape(-1)
    stream = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(stream.reshape(-1), bitorder="little")


def unpack_indices(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_indices`: ``count`` integers of ``bits`` bits."""
    stream = np.unpackbits(packed.astype(np.uint8, copy=False), count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (stream.reshape(count, bits).astype(np.uint16) @ weights).astype(np.int64)


def compress_weight(weight: np.ndarray, mask: np.ndarray, layout: NMLayout) -> tuple[np.ndarray, np.ndarray, bool]:
    """Compress one pruned weight: ``(values [R, G*n], packed indices, exact_from_indices)``.

    ``weight`` is any array of the layer's shape (its raw bits keep every dtype exact), ``mask``
    its boolean mask. ``exact_from_indices`` is False when some group keeps fewer than ``n``
    values, in which case the mask must be stored beside the indices; the padded slots hold the
    all-zero element (``+0.0``).

    Rows are encoded ``CHUNK_ELEMENTS`` weights at a time, a multiple of 8 rows each (so every
    chunk's indices fill whole bytes of the stream): the temporaries stay small beside the weight.
    """
    n, m = layout.n, layout.m
    w_rows = _rows(weight, layout.axis)
    k_rows = _rows(mask.astype(bool, copy=False), layout.axis)
    rows, k = w_rows.shape
    bits = index_bits(m)
    per_row = k // m * n  # kept values per row
    values = np.empty((rows, per_row), dtype=w_rows.dtype)
    packed = np.empty((rows * per_row * bits + 7) // 8, dtype=np.uint8)
    step = max(8, CHUNK_ELEMENTS // max(k, 1) // 8 * 8)
    exact = True
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        groups_mask = k_rows[start:stop].reshape(stop - start, k // m, m)
        # Kept positions first (in index order), then pruned ones: a stable sort on "not kept".
        order = np.argsort(~groups_mask, axis=-1, kind="stable")[..., :n]
        chunk = np.take_along_axis(w_rows[start:stop].reshape(stop - start, k // m, m), order, axis=-1)
        if not bool((groups_mask.sum(axis=-1) == n).all()):  # padded slots point at pruned positions: +0.0
            exact = False
            chunk = np.where(np.take_along_axis(groups_mask, order, axis=-1), chunk, np.zeros((), chunk.dtype))
        values[start:stop] = chunk.reshape(stop - start, per_row)
        stream = pack_indices(order.astype(np.uint8), bits)
        offset = start * per_row * bits // 8  # whole bytes: ``start`` is a multiple of 8 rows
        packed[offset : offset + stream.size] = stream
    return values, packed, exact


def _group_indices(packed: np.ndarray, layout: NMLayout) -> np.ndarray:
    """The in-group index of every kept value, ``[R, G, n]``, checked against the layout."""
    n, m, shape, axis = layout.n, layout.m, layout.shape, layout.axis
    k = shape[axis]
    rows = math.prod(shape) // k if k else 0
    count = rows * (k // m) * n
    bits = index_bits(m)
    if packed.ndim != 1 or packed.size != (count * bits + 7) // 8:
        raise CheckpointError(
            f"compressed indices of {layout.param} have {packed.size} bytes, expected {(count * bits + 7) // 8}"
        )
    indices = unpack_indices(packed, count, bits)
    if count and int(indices.max()) >= m:
        raise CheckpointError(f"compressed indices of {layout.param} point outside their groups of {m}")
    return indices.reshape(rows, k // m, n)


def decompress_mask(packed: np.ndarray, layout: NMLayout) -> np.ndarray:
    """The boolean mask the indices of one compressed parameter name (its values are not needed).

    Raises:
        CheckpointError: the indices do not fit the layout.
    """
    index = _group_indices(packed, layout)
    rows, groups, _ = index.shape
    mask = np.zeros((rows, groups, layout.m), dtype=bool)
    np.put_along_axis(mask, index, True, axis=-1)
    return _unrows(mask.reshape(rows, groups * layout.m), layout.shape, layout.axis)


_MASK_TABLES: dict[tuple[int, int], np.ndarray | None] = {}


def _mask_table(n: int, m: int) -> np.ndarray | None:
    """Per index-stream byte, the packed mask bytes of the groups it holds; None when a byte does not
    hold whole groups that fill whole mask bytes (then masks are decoded index by index)."""
    key = (n, m)
    if key not in _MASK_TABLES:
        bits = index_bits(m)
        table = None
        if m & (m - 1) == 0 and 8 % (n * bits) == 0 and (8 // (n * bits)) * m % 8 == 0:
            groups = 8 // (n * bits)  # 2 for 2:4: one byte of indices is one byte of mask
            index = unpack_indices(np.arange(256, dtype=np.uint8), 256 * groups * n, bits).reshape(256, groups, n)
            mask = np.zeros((256, groups, m), dtype=bool)
            np.put_along_axis(mask, index, True, axis=-1)
            table = np.packbits(mask.reshape(256, groups * m), axis=1, bitorder="little")
        _MASK_TABLES[key] = table
    return _MASK_TABLES[key]


def decompress_packed_mask(packed: np.ndarray, layout: NMLayout) -> np.ndarray:
    """:func:`decompress_mask` bit-packed as ``numpy.packbits(mask.reshape(-1), bitorder="little")``.

    Groups along the last axis whose indices fill whole bytes (2:4, 1:4, 1:2, 1:16, 2:16) take one
    table lookup per byte of indices; other layouts are decoded index by index.

    Raises:
        CheckpointError: the indices do not fit the layout.
    """
    n, m, shape, axis = layout.n, layout.m, layout.shape, layout.axis
    table = _mask_table(n, m)
    k = shape[axis]
    groups = math.prod(shape) // m if k else 0
    if table is not None and axis == len(shape) - 1 and groups % (table.shape[1] * 8 // m) == 0:
        expected = (groups * n * index_bits(m) + 7) // 8
        if packed.ndim != 1 or packed.size != expected:
            raise CheckpointError(f"compressed indices of {layout.param} have {packed.size} bytes, expected {expected}")
        return table[packed.astype(np.uint8, copy=False)].reshape(-1)
    return np.packbits(decompress_mask(packed, layout).reshape(-1), bitorder="little")


def decompress_weight(values: np.ndarray, packed: np.ndarray, layout: NMLayout) -> tuple[np.ndarray, np.ndarray]:
    """Rebuild ``(effective weight, boolean mask from the indices)`` of one compressed parameter.

    The weight has ``values``' dtype; pruned positions hold the all-zero element (``+0.0``).

    Raises:
        CheckpointError: the values or indices do not fit the layout.
    """
    n, m, shape, axis = layout.n, layout.m, layout.shape, layout.axis
    k = shape[axis]
    rows = math.prod(shape) // k if k else 0
    if tuple(values.shape) != (rows, k // m * n):
        raise CheckpointError(
            f"compressed values of {layout.param} have shape {tuple(values.shape)}, expected {(rows, k // m * n)}"
        )
    index = _group_indices(packed, layout)
    dense = np.zeros((rows, k // m, m), dtype=values.dtype)
    np.put_along_axis(dense, index, values.reshape(rows, k // m, n), axis=-1)
    mask = np.zeros((rows, k // m, m), dtype=bool)
    np.put_along_axis(mask, index, True, axis=-1)
    return _unrows(dense.reshape(rows, k), shape, axis), _unrows(mask.reshape(rows, k), shape, axis)

"""Stored weights against their packed masks, torch-free: every weight a mask prunes must be exactly ``+0.0``.

The rule of DESIGN.md section 2 (effective weights are ``+0.0`` where pruned, never ``-0.0``), for
weights read as raw bits (unsigned integers of their size, any float dtype, bfloat16 included)
and masks packed as :func:`nmcli.nm.bits.pack_mask` writes them (``numpy.packbits`` of the flat
mask, little bit order). A weight counts when any of its bits is set: ``-0.0`` breaks the rule.

The check runs in chunks of ``CHUNK`` elements: the chunk's non-zero weights are packed into bits
(``numpy.packbits``, vectorised) and ANDed with the complement of the mask's bytes; memory stays
at one chunk whatever the tensor's size. :func:`pruned_nonzero_in_file` streams a tensor from its
file, read once through small memory-mapped windows (the process's RSS stays flat).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nmcli.errors import CheckpointError

CHUNK = 1 << 20  # elements per step (a multiple of 8: whole mask bytes)
READ = 16 << 20  # bytes per memory-mapped window
_READ_AHEAD = 64 << 20  # the kernel is asked to read this far ahead, while a piece is checked
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.int64)


def _count(values: np.ndarray, packed: np.ndarray, nonzero: np.ndarray) -> int:
    """Pruned non-zero weights in ``values`` (flat, unsigned) against its mask bytes ``packed`` (same start)."""
    np.not_equal(values, 0, out=nonzero[: values.size])
    bits = np.packbits(nonzero[: values.size], bitorder="little")
    broken = np.bitwise_and(bits, np.invert(packed[: bits.size]))
    if not broken.any():
        return 0
    return int(_POPCOUNT[broken].sum())


def pruned_nonzero(values: np.ndarray, packed: np.ndarray) -> int:
    """How many weights are not ``+0.0`` where the packed mask prunes them.

    Args:
        values: the weights' bits as unsigned integers (any shape; read in flat order).
        packed: the packed mask, ``ceil(values.size / 8)`` bytes.

    Raises:
        CheckpointError: the mask does not have one bit per weight.
    """
    flat = np.asarray(values).reshape(-1)
    mask = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if mask.size != (flat.size + 7) // 8:
        raise CheckpointError(f"a packed mask of {mask.size} bytes cannot cover {flat.size} weights")
    nonzero = np.empty(min(CHUNK, flat.size), dtype=bool)
    total = 0
    for start in range(0, flat.size, CHUNK):
        total += _count(flat[start : start + CHUNK], mask[start // 8 :], nonzero)
    return total


def pruned_nonzero_in_file(
    path: str | os.PathLike[str],
    offset: int,
    nbytes: int,
    itemsize: int,
    packed: np.ndarray,
    cancelled: Callable[[], bool] | None = None,
) -> int:
    """:func:`pruned_nonzero` of a tensor stored at ``offset`` (``nbytes`` bytes of ``itemsize``-byte elements) in a file.

    Read once, front to back, through read-only memory maps of ``READ`` bytes, each unmapped
    before the next (the process's RSS stays at one window; no copy out of the page cache); the
    kernel reads ahead (``POSIX_FADV_WILLNEED``) while a window is checked. ``cancelled`` is asked
    before every window: once it says yes, the count so far is returned (a caller on another
    thread stops quickly).

    Raises:
        CheckpointError: the file cannot be read or ends inside the tensor; the mask does not fit.
    """
    if itemsize not in _UNSIGNED or nbytes % itemsize:
        raise CheckpointError(f"{path}: a tensor of {nbytes} bytes cannot hold {itemsize}-byte weights")
    count = nbytes // itemsize
    mask = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if mask.size != (count + 7) // 8:
        raise CheckpointError(f"{path}: a packed mask of {mask.size} bytes cannot cover {count} weights")
    step = max(8 * itemsize, READ // (8 * itemsize) * (8 * itemsize))  # whole mask bytes per window
    nonzero = np.empty(min(CHUNK, max(count, 1)), dtype=bool)
    total = 0
    try:
        with open(Path(path), "rb", buffering=0) as fh:
            if os.fstat(fh.fileno()).st_size < offset + nbytes:
                raise CheckpointError(f"{path} ends inside a tensor: it is truncated; re-create it")
            done = 0
            while done < nbytes and not (cancelled and cancelled()):
                with contextlib.suppress(AttributeError, OSError):
                    os.posix_fadvise(fh.fileno(), offset + done, _READ_AHEAD, os.POSIX_FADV_WILLNEED)
                want = min(step, nbytes - done)
                start = offset + done
                aligned = start - start % mmap.ALLOCATIONGRANULARITY
                window = mmap.mmap(fh.fileno(), start - aligned + want, prot=mmap.PROT_READ, offset=aligned)
                try:
                    piece = np.frombuffer(
                        window, dtype=_UNSIGNED[itemsize], count=want // itemsize, offset=start - aligned
                    )
                    first = done // itemsize
                    for begin in range(0, piece.size, CHUNK):
                        element = first + begin
                        total += _count(piece[begin : begin + CHUNK], mask[element // 8 :], nonzero)
                    del piece
                finally:
                    with contextlib.suppress(BufferError):  # a view left by an error: freed with it
                        window.close()
                done += want
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} could not be read ({exc})") from exc
    return total

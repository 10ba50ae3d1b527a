"""Compressed N:M storage of an nmcli/1 checkpoint (``nmcli export --compress``).

A pruned weight keeps only ``n`` of every ``m`` values, so it can be stored as its kept values
plus the position of each inside its group: for 2:4 that is half the values and a 2-bit index per
kept value -- the "sparse-24" content that cuSPARSELt and compressed-tensors store. The file is
still one ``.safetensors`` file; :class:`nmcli.checkpoint.CheckpointReader` recognises it by its
format tag and decodes it transparently (through :class:`DecodedFile`), so ``inspect``, ``export``
and every other command read it back exactly: the same effective weights, masks and metadata.

Layout (``__metadata__["format"] == "nmcli/1+compressed"``, ``"nmcli"`` is the usual JSON):

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

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nmcli.checkpoint import (
    COMPRESSED_FORMAT,
    DENSE_PREFIX,
    FORMAT,
    MASK_PREFIX,
    Checkpoint,
    LayerEntry,
    history_record,
    load_checkpoint,
    pack_mask,
    unpack_mask,
)
from nmcli.errors import CheckpointError
from nmcli.io import atomic_output

VALUES_PREFIX = "__nmcli__/nm/values/"
INDICES_PREFIX = "__nmcli__/nm/indices/"


def index_bits(m: int) -> int:
    """Bits per in-group index for groups of ``m`` (2 for 2:4, 3 for 4:8)."""
    return max(1, math.ceil(math.log2(m)))


def _rows(weight: torch.Tensor, axis: int) -> torch.Tensor:
    moved = weight.movedim(axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def _unrows(rows: torch.Tensor, shape: tuple[int, ...], axis: int) -> torch.Tensor:
    moved_shape = [*shape[:axis], *shape[axis + 1 :], shape[axis]]
    return rows.reshape(moved_shape).movedim(-1, axis).contiguous()


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


def compress_weight(
    weight: torch.Tensor, mask: torch.Tensor, entry: LayerEntry
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Compress one pruned weight: ``(values [R, G*n], packed indices, exact_from_indices)``.

    ``exact_from_indices`` is False when some group keeps fewer than ``n`` values, in which case the
    mask must be stored beside the indices.
    """
    n, m = entry.n, entry.m
    w_rows = _rows(weight, entry.axis)
    k_rows = _rows(mask, entry.axis)
    rows, k = w_rows.shape
    groups_mask = k_rows.reshape(rows, k // m, m)
    # Kept positions first (in index order), then pruned ones: a stable sort on "not kept".
    order = torch.sort((~groups_mask).to(torch.int8), dim=-1, stable=True).indices[..., :n]
    values = torch.gather(w_rows.reshape(rows, k // m, m), -1, order)
    exact = bool(groups_mask.sum(dim=-1).eq(n).all())
    if not exact:  # padded slots point at pruned positions, whose effective value is +0.0
        values = torch.where(torch.gather(groups_mask, -1, order), values, torch.zeros((), dtype=values.dtype))
    packed = pack_indices(order.to(torch.uint8).numpy(), index_bits(m))
    return values.reshape(rows, -1).contiguous(), torch.from_numpy(packed), exact


def decompress_weight(
    values: torch.Tensor, packed: torch.Tensor, entry: LayerEntry
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebuild ``(effective weight, mask from the indices)`` of one compressed parameter."""
    n, m, shape, axis = entry.n, entry.m, entry.shape, entry.axis
    k = shape[axis]
    rows = math.prod(shape) // k
    if tuple(values.shape) != (rows, k // m * n):
        raise CheckpointError(
            f"compressed values of {entry.param} have shape {tuple(values.shape)}, expected {(rows, k // m * n)}"
        )
    count = rows * (k // m) * n
    indices = unpack_indices(packed.numpy(), count, index_bits(m))
    if count and int(indices.max()) >= m:
        raise CheckpointError(f"compressed indices of {entry.param} point outside their groups of {m}")
    index = torch.from_numpy(indices).reshape(rows, k // m, n)
    dense = torch.zeros((rows, k // m, m), dtype=values.dtype)
    dense.scatter_(-1, index, values.reshape(rows, k // m, n))
    mask = torch.zeros((rows, k // m, m), dtype=torch.bool)
    mask.scatter_(-1, index, True)
    return _unrows(dense.reshape(rows, k), shape, axis), _unrows(mask.reshape(rows, k), shape, axis)


def compressed_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The tensors of the compressed file for ``ckpt`` (see the module docstring for the layout)."""
    out: dict[str, torch.Tensor] = {}
    layers = {e.param: e for e in ckpt.meta.layers}
    for name, value in ckpt.tensors.items():
        entry = layers.get(name)
        if entry is None:
            out[name] = value
            continue
        values, packed, exact = compress_weight(value, ckpt.masks[name], entry)
        out[VALUES_PREFIX + name] = values
        out[INDICES_PREFIX + name] = packed
        if not exact:
            out[MASK_PREFIX + name] = pack_mask(ckpt.masks[name])
    for name, value in ckpt.dense.items():
        out[DENSE_PREFIX + name] = value
    return out


def write_compressed(
    ckpt: Checkpoint,
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    inputs: tuple[str | os.PathLike[str], ...] = (),
    arguments: Mapping[str, Any] | None = None,
) -> Path:
    """Write the compressed copy of ``ckpt`` to ``path`` atomically.

    Raises:
        CheckpointError: the checkpoint has no pruned layers (nothing to compress).
        OutputExistsError: ``path`` exists without ``force``, or is one of ``inputs``.
    """
    from safetensors.torch import save_file

    if not ckpt.meta.layers:
        raise CheckpointError("the checkpoint has no pruned layers: there is nothing to compress; prune it first")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in compressed_tensors(ckpt).items()}
    meta = ckpt.meta.to_json()
    meta["history"] = [*meta["history"], history_record("export", {"compress": True, **(arguments or {})})]
    metadata = {"format": COMPRESSED_FORMAT, "nmcli": json.dumps(meta, separators=(",", ":"))}
    with atomic_output(path, force=force, inputs=inputs) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def compress_checkpoint(source: str | os.PathLike[str], path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Read an nmcli/1 checkpoint and write its compressed copy to ``path``."""
    return write_compressed(load_checkpoint(source, dense=True), path, force=force, inputs=(source,))


def is_compressed(metadata: Mapping[str, str] | None) -> bool:
    """Whether a safetensors header's metadata marks an nmcli compressed file."""
    return bool(metadata) and (metadata or {}).get("format") == COMPRESSED_FORMAT


class _Shape:
    def __init__(self, shape: tuple[int, ...]) -> None:
        self._shape = shape

    def get_shape(self) -> list[int]:
        return list(self._shape)


class DecodedFile:
    """A ``safe_open`` handle over a compressed file that presents the plain nmcli/1 view.

    It answers ``metadata()``, ``keys()``, ``get_tensor()`` and ``get_slice().get_shape()`` as the
    handle of the uncompressed checkpoint would; weights are decoded one at a time, on request.
    """

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        raw = dict(handle.metadata() or {})
        try:
            meta = json.loads(raw["nmcli"])
            self._layers = {str(e["param"]): LayerEntry.from_json(e) for e in meta.get("layers", [])}
        except Exception as exc:  # malformed JSON or entry: one user problem
            raise CheckpointError(
                f"unreadable nmcli metadata in a compressed checkpoint ({exc}): re-create it"
            ) from exc
        self._raw = {**raw, "format": FORMAT, "compressed": COMPRESSED_FORMAT}
        stored = list(handle.keys())
        self._stored = set(stored)
        keys: list[str] = []
        for key in stored:
            if key.startswith(VALUES_PREFIX):
                keys.append(key[len(VALUES_PREFIX) :])
            elif not key.startswith((INDICES_PREFIX, MASK_PREFIX)):
                keys.append(key)
        keys += [MASK_PREFIX + p for p in self._layers if INDICES_PREFIX + p in self._stored]
        self._keys = keys
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def metadata(self) -> dict[str, str]:
        return dict(self._raw)

    def keys(self) -> list[str]:
        return list(self._keys)

    def _decoded(self, param: str) -> tuple[torch.Tensor, torch.Tensor]:
        if param not in self._cache:
            entry = self._layers.get(param)
            if entry is None:
                raise CheckpointError(f"compressed weight {param} has no layer entry")
            weight, mask = decompress_weight(
                self._handle.get_tensor(VALUES_PREFIX + param), self._handle.get_tensor(INDICES_PREFIX + param), entry
            )
            if MASK_PREFIX + param in self._stored:
                mask = unpack_mask(self._handle.get_tensor(MASK_PREFIX + param), entry.shape)
            self._cache = {param: (weight, mask)}  # keep one: files larger than memory still stream
        return self._cache[param]

    def get_tensor(self, name: str) -> torch.Tensor:
        if VALUES_PREFIX + name in self._stored:
            return self._decoded(name)[0]
        if name.startswith(MASK_PREFIX) and INDICES_PREFIX + name[len(MASK_PREFIX) :] in self._stored:
            return pack_mask(self._decoded(name[len(MASK_PREFIX) :])[1])
        return self._handle.get_tensor(name)

    def get_slice(self, name: str) -> Any:
        param = name[len(MASK_PREFIX) :] if name.startswith(MASK_PREFIX) else name
        entry = self._layers.get(param)
        if entry is not None and INDICES_PREFIX + param in self._stored:
            return _Shape(entry.shape if param == name else ((math.prod(entry.shape) + 7) // 8,))
        return self._handle.get_slice(name)

"""Compressed sharded checkpoints: ``nmcli export DIR --compress`` of a sharded nmcli/1 directory.

The layout (DESIGN.md section 3c) is the sharded one of :mod:`nmcli.sharded` with every shard in
the compressed form of :mod:`nmcli.compressed`:

* the same shard file names, each holding the compressed form of the tensors it held: for a
  pruned weight ``P``, ``__nmcli__/nm/values/P`` and ``__nmcli__/nm/indices/P`` (and its packed
  mask ``__nmcli__/mask/P`` only when some group keeps fewer than ``n`` values), every other
  tensor as it was; the shards' metadata says ``"format": "nmcli/1+compressed"`` (the directory is
  for nmcli: ``from_pretrained`` would find every compressed weight missing);
* ``model.safetensors.index.json`` whose ``weight_map`` names the stored tensors;
* ``config.json``, tokenizer and other small files copied;
* the ``nmcli.safetensors`` sidecar: the ``nmcli`` metadata with ``"format": "nmcli/1+compressed"``
  and ``"layout": "sharded"`` (history gains an ``export`` record), and any dense weights.

It is written tensor by tensor (memory ~ one tensor) into an atomic directory, and read back by
:class:`nmcli.sharded.ShardedCheckpointReader` through :class:`CompressedShards`, which decodes it
to exactly the effective weights and masks of the uncompressed directory (numpy only for the
masks: ``inspect`` and ``sad`` stay torch-free).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nmcli.checkpoint import (
    COMPRESSED_FORMAT,
    DENSE_PREFIX,
    MASK_PREFIX,
    LayerEntry,
    _DataLayout,
    _torch_from_bits,
    decode_compressed,
    history_record,
    packed_size,
)
from nmcli.compressed import INDICES_PREFIX, VALUES_PREFIX, index_bits
from nmcli.errors import CheckpointError
from nmcli.patterns import TensorBits

if TYPE_CHECKING:
    from nmcli.sharded import ShardedModel

ProgressCallback = Callable[[int, int, str], None]


class CompressedShards:
    """The shards of a compressed directory seen as the uncompressed ones.

    Pruned weights are decoded one at a time from the memory-mapped bits of their shard (any
    dtype, bfloat16 included, without torch); masks from the indices alone (or the stored mask).
    """

    def __init__(self, model: ShardedModel, layers: Sequence[LayerEntry]) -> None:
        self.model = model
        stored = model.tensors
        self.layers = {e.param: e for e in layers if VALUES_PREFIX + e.param in stored}
        missing = [
            e.param
            for e in layers
            if e.param not in stored
            and (VALUES_PREFIX + e.param not in stored or INDICES_PREFIX + e.param not in stored)
        ]
        if missing:
            raise CheckpointError(
                f"{model.folder}: pruned weight {missing[0]} has neither its tensor nor its compressed values and "
                "indices in the shards: the directory is incomplete; re-create it"
            )
        unlisted = [n for n in stored if n.startswith(VALUES_PREFIX) and n[len(VALUES_PREFIX) :] not in self.layers]
        if unlisted:
            raise CheckpointError(
                f"{model.folder}: compressed weight {unlisted[0][len(VALUES_PREFIX) :]} has no layer entry in "
                "the sidecar's metadata: re-create the directory with nmcli export --compress"
            )
        self.state_names = [
            name[len(VALUES_PREFIX) :] if name.startswith(VALUES_PREFIX) else name
            for name in stored
            if not name.startswith((INDICES_PREFIX, MASK_PREFIX))
        ]
        self._layout: tuple[str, _DataLayout] | None = None
        self._cache: dict[str, tuple[TensorBits | None, TensorBits]] = {}

    def _bits(self, name: str) -> TensorBits:
        info = self.model.tensors[name]
        if self._layout is None or self._layout[0] != info.file:  # one shard's memory map at a time
            self._layout = (info.file, _DataLayout(self.model.folder / info.file))
        return self._layout[1].bits(name)

    def _decoded(self, param: str, *, weight: bool) -> tuple[TensorBits | None, TensorBits]:
        cached = self._cache.get(param)
        if cached is None or (weight and cached[0] is None):
            cached = decode_compressed(self.layers[param], self._bits, self.model.tensors, weight=weight)
            self._cache = {param: cached}  # one: large directories still stream
        return cached

    @property
    def decoded_bytes(self) -> int:
        """The size of the tensors once decoded (what loading the checkpoint whole holds)."""
        total = 0
        for name, info in self.model.tensors.items():
            if name.startswith(VALUES_PREFIX):
                entry = self.layers[name[len(VALUES_PREFIX) :]]
                per_value = info.nbytes // max(1, math.prod(info.shape))
                total += math.prod(entry.shape) * per_value
            elif not name.startswith((INDICES_PREFIX, MASK_PREFIX)):
                total += info.nbytes
        return total

    def is_compressed(self, param: str) -> bool:
        return param in self.layers

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The decoded shape of a compressed weight or of its mask; None for names stored as they are."""
        if name.startswith(MASK_PREFIX) and name[len(MASK_PREFIX) :] in self.layers:
            return (packed_size(self.layers[name[len(MASK_PREFIX) :]].shape),)
        if name in self.layers:
            return self.layers[name].shape
        return None

    def bits(self, param: str) -> TensorBits:
        """The effective weight of a compressed parameter, as bits."""
        weight = self._decoded(param, weight=True)[0]
        assert weight is not None
        return weight

    def tensor(self, param: str, *, numpy: bool) -> Any:
        value = self.bits(param)
        return value.bits.view(np.dtype(value.dtype)) if numpy else _torch_from_bits(value)

    def packed_mask_array(self, param: str) -> np.ndarray:
        return np.asarray(self._decoded(param, weight=False)[1].bits, dtype=np.uint8).reshape(-1)


def directory_bytes(folder: str | os.PathLike[str]) -> int:
    """Total size of the files in a directory (recursively)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def compress_directory(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    arguments: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Write the compressed copy of the sharded checkpoint ``source`` into the directory ``out``.

    One tensor at a time: each is read from its shard (the effective weight) with its mask from the
    sidecar, compressed by the codec of :mod:`nmcli.compressed` (:func:`nmcli.checkpoint.compressed_entries`)
    and spooled into the output shard of the same name; dense weights go to the sidecar. The whole
    directory appears only when complete (:func:`nmcli.sharded.atomic_directory`).

    Raises:
        CheckpointError: ``source`` is not a valid sharded checkpoint, or has no pruned layers.
        OutputExistsError: ``out`` exists without ``force``, is not nmcli's, or is (inside) the input.
    """
    from nmcli.checkpoint import compressed_entries
    from nmcli.sharded import (
        INDEX,
        LAYOUT,
        SIDECAR,
        ShardedCheckpointReader,
        SidecarWriter,
        _Progress,
        atomic_directory,
        copy_side_files,
        read_header,
    )

    folder = Path(source)
    with ShardedCheckpointReader(folder) as reader:
        meta = reader.meta
        assert meta is not None
        if not meta.layers:
            raise CheckpointError(f"{folder} has no pruned layers: there is nothing to compress; prune it first")
        layers = {e.param: e for e in meta.layers}
        missing = sorted(set(layers) - set(reader.state_names))
        if missing:
            raise CheckpointError(f"{folder}: layer {missing[0]} has no tensor in the shards: re-create it")
        model = reader.model
        bar = _Progress(progress, model.total_bytes)
        with atomic_directory(out, force=force, inputs=[folder]) as tmp:
            copy_side_files(folder, tmp)
            weight_map: dict[str, str] = {}
            total = 0  # bytes of tensor data in the shards (the index's total_size)
            for number, file in enumerate(model.files, 1):
                header = model.headers[file]
                metadata = {**header.metadata, "format": COMPRESSED_FORMAT}
                # tensors arrive one by one (whether a mask is stored is known only once encoded): the
                # header is reserved at its largest, every mask stored, and padded when fewer are
                shard = SidecarWriter(tmp / file, reserve=_header_reserve(header.tensors, layers, metadata))
                try:
                    # the input's own names, in file order (an input that is itself compressed is decoded)
                    for name in _decoded_names(header.tensors, reader):
                        value = reader.tensor(name)
                        entry = layers.get(name)
                        stored = compressed_entries(name, value, reader.mask(name), entry) if entry else {name: value}
                        for key, tensor in stored.items():
                            shard.add(key, tensor)
                            weight_map[key] = file
                            total += tensor.numel() * tensor.element_size()
                        del value, stored
                    shard.finish(metadata)
                finally:
                    shard.close()
                bar.advance(sum(t.nbytes for t in header.tensors), f"shard {number}/{len(model.files)}")
            record = meta.to_json()
            record["history"] = [*record["history"], history_record("export", {"compress": True, **(arguments or {})})]
            metadata = {
                "format": COMPRESSED_FORMAT,
                "layout": LAYOUT,
                "nmcli": json.dumps(record, separators=(",", ":")),
            }
            dense = [t for t in read_header(folder / SIDECAR).tensors if t.name.startswith(DENSE_PREFIX)]
            sidecar = SidecarWriter(tmp / SIDECAR, reserve=_header_reserve(dense, {}, metadata))  # the exact header
            try:
                for info in dense:
                    sidecar.add(info.name, reader.dense(info.name[len(DENSE_PREFIX) :]))
                sidecar.finish(metadata)
            finally:
                sidecar.close()
            if (folder / INDEX).is_file() or len(model.files) > 1:
                index_meta = dict(model.index_metadata)
                index_meta["total_size"] = total
                (tmp / INDEX).write_text(
                    json.dumps({"metadata": index_meta, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
                    + "\n"
                )
    return Path(out)


def _header_reserve(tensors: Sequence[Any], layers: dict[str, LayerEntry], metadata: dict[str, str]) -> int:
    """The largest header the compressed form of a shard's tensors can have (every mask stored), less its size prefix."""
    from nmcli.checkpoint import safetensors_header

    entries: list[tuple[str, str, tuple[int, ...], int]] = []
    for info in tensors:
        entry = layers.get(info.name)
        if entry is None or info.name.startswith((VALUES_PREFIX, INDICES_PREFIX, MASK_PREFIX)):
            entries.append((info.name, info.dtype, info.shape, info.nbytes))
            continue
        rows = math.prod(entry.shape) // entry.shape[entry.axis] if entry.shape[entry.axis] else 0
        per_row = entry.shape[entry.axis] // entry.m * entry.n
        itemsize = info.nbytes // max(1, math.prod(info.shape))
        indices = (rows * per_row * index_bits(entry.m) + 7) // 8
        entries += [
            (VALUES_PREFIX + info.name, info.dtype, (rows, per_row), rows * per_row * itemsize),
            (INDICES_PREFIX + info.name, "U8", (indices,), indices),
            (MASK_PREFIX + info.name, "U8", (packed_size(entry.shape),), packed_size(entry.shape)),
        ]
    return len(safetensors_header(entries, metadata)) - 8


def _decoded_names(tensors: Sequence[Any], reader: Any) -> list[str]:
    """A shard's tensor names as the reader presents them (compressed values under their weight's name)."""
    names = []
    for info in tensors:
        name = str(info.name)
        if name.startswith(VALUES_PREFIX):
            names.append(name[len(VALUES_PREFIX) :])
        elif not name.startswith((INDICES_PREFIX, MASK_PREFIX)):
            names.append(name)
    return names


__all__ = ["CompressedShards", "compress_directory", "directory_bytes"]

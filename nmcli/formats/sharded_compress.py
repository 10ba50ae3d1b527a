"""``nmcli export --compress`` of a sharded checkpoint: compressed shards written one tensor at a time."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nmcli.errors import CheckpointError
from nmcli.formats.checkpoint import (
    COMPRESSED_FORMAT,
    DENSE_PREFIX,
    MASK_PREFIX,
    LayerEntry,
    compressed_entries,
    history_record,
)
from nmcli.formats.safetensors import read_header, safetensors_header
from nmcli.formats.sharded import INDEX, LAYOUT, SIDECAR, SidecarWriter, atomic_directory, copy_side_files
from nmcli.formats.sharded_checkpoint import ShardedCheckpointReader
from nmcli.nm.bits import packed_size
from nmcli.nm.codec import INDICES_PREFIX, VALUES_PREFIX, index_bits
from nmcli.progress import ByteProgress, ProgressCallback


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
    sidecar, compressed by the codec of :mod:`nmcli.nm.codec` (:func:`nmcli.formats.checkpoint.compressed_entries`)
    and spooled into the output shard of the same name; dense weights go to the sidecar. The whole
    directory appears only when complete (:func:`nmcli.formats.sharded.atomic_directory`).

    Raises:
        CheckpointError: ``source`` is not a valid sharded checkpoint, or has no pruned layers.
        OutputExistsError: ``out`` exists without ``force``, is not nmcli's, or is (inside) the input.
    """

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
        bar = ByteProgress(progress, model.total_bytes)
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

"""Compressed sharded checkpoints: ``nmcli export DIR --compress`` of a sharded nmcli/1 directory.

The layout (DESIGN.md section 3c) is the sharded one of :mod:`nmcli.formats.sharded` with every shard in
the compressed form of :mod:`nmcli.nm.codec`:

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
:class:`nmcli.formats.sharded_checkpoint.ShardedCheckpointReader` through :class:`CompressedShards`, which decodes it
to exactly the effective weights and masks of the uncompressed directory (numpy only for the
masks: ``inspect`` and ``sad`` stay torch-free).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from nmcli.errors import CheckpointError
from nmcli.formats.checkpoint import (
    MASK_PREFIX,
    LayerEntry,
    decode_compressed,
)
from nmcli.formats.safetensors import DataLayout, torch_from_bits
from nmcli.nm.bits import TensorBits, packed_size
from nmcli.nm.codec import INDICES_PREFIX, VALUES_PREFIX

if TYPE_CHECKING:
    from nmcli.formats.sharded import ShardedModel


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
        self._layout: tuple[str, DataLayout] | None = None
        self._cache: dict[str, tuple[TensorBits | None, TensorBits]] = {}

    def _bits(self, name: str) -> TensorBits:
        info = self.model.tensors[name]
        if self._layout is None or self._layout[0] != info.file:  # one shard's memory map at a time
            self._layout = (info.file, DataLayout(self.model.folder / info.file))
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
        return value.bits.view(np.dtype(value.dtype)) if numpy else torch_from_bits(value)

    def packed_mask_array(self, param: str) -> np.ndarray:
        return np.asarray(self._decoded(param, weight=False)[1].bits, dtype=np.uint8).reshape(-1)

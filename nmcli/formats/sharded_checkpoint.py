"""Reading a sharded nmcli checkpoint (HF directory + sidecar) like a single nmcli/1 file."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nmcli.errors import CheckpointError, InputError
from nmcli.formats.checkpoint import (
    COMPRESSED_FORMAT,
    DENSE_PREFIX,
    MASK_PREFIX,
    Checkpoint,
    CheckpointMeta,
    CheckpointReader,
    raise_problems,
    validate_checkpoint,
)
from nmcli.formats.checksum import (
    Integrity,
    verify_file,
)
from nmcli.member import check_plain_name
from nmcli.nm.bits import unpack_mask

if TYPE_CHECKING:
    import torch

    from nmcli.formats.compressed_shards import CompressedShards
from nmcli.formats.compressed_shards import CompressedShards
from nmcli.formats.reader import Closeable
from nmcli.formats.sharded import SIDECAR, ShardedModel, ShardReader, is_sharded_checkpoint, sidecar_path, weight_files
from nmcli.nm.maskcheck import pruned_nonzero, pruned_nonzero_in_file


class ShardedCheckpointReader(Closeable):
    """A sharded checkpoint directory read like :class:`nmcli.formats.checkpoint.CheckpointReader`.

    Masks and dense weights come from the sidecar (``numpy=True``: without torch), state-dict
    names and shapes from the shard headers, tensors one at a time from the shards.
    """

    def __init__(self, path: str | os.PathLike[str], *, numpy: bool = False) -> None:
        self.path = Path(path)
        if not is_sharded_checkpoint(self.path):
            raise CheckpointError(f"{self.path} is not an nmcli sharded checkpoint: it has no {SIDECAR}")
        fix = "re-create the directory with nmcli prune"
        sidecar = sidecar_path(self.path)
        self._sidecar = CheckpointReader(sidecar, numpy=numpy)
        self._lock = threading.RLock()  # packed masks and pruned_nonzero may be called from two threads
        try:
            if self._sidecar.meta is None:
                raise CheckpointError(f"{self.path / SIDECAR} holds no nmcli metadata: re-create the checkpoint")
            for shard, _ in self._sidecar.meta.source.shards:  # names of the input's shards, never opened here
                check_plain_name(shard, source=sidecar, entry="the recorded source's shards", fix=fix)
            self.meta: CheckpointMeta | None = self._sidecar.meta
            self.raw_metadata = self._sidecar.raw_metadata
            self.model = ShardedModel.open(self.path)
            self._reader = ShardReader(self.model, numpy=numpy)
            self._numpy = numpy
            self._compressed: CompressedShards | None = None
            if self.raw_metadata.get("compressed"):  # nmcli export --compress: decoded transparently
                self._compressed = CompressedShards(self.model, self.meta.layers)
        except BaseException:
            self._sidecar.close()
            raise

    def close(self) -> None:
        self._reader.close()
        self._sidecar.close()

    @property
    def is_nmcli(self) -> bool:
        return True

    @property
    def compressed(self) -> bool:
        """Whether the shards are compressed (``nmcli export --compress``), decoded on read."""
        return self._compressed is not None

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the state dict once read (compressed shards decoded): what :meth:`load` holds."""
        return self._compressed.decoded_bytes if self._compressed else self.model.total_bytes

    @property
    def state_names(self) -> list[str]:
        return self._compressed.state_names if self._compressed else list(self.model.tensors)

    @property
    def mask_names(self) -> list[str]:
        return list(self._compressed.layers) if self._compressed else self._sidecar.mask_names

    @property
    def dense_names(self) -> list[str]:
        return self._sidecar.dense_names

    def shape(self, name: str) -> tuple[int, ...]:
        decoded = self._compressed.shape(name) if self._compressed else None
        if decoded is not None:
            return decoded
        if name.startswith(MASK_PREFIX) or name.startswith(DENSE_PREFIX):
            return self._sidecar.shape(name)
        if name not in self.model.tensors:
            raise KeyError(name)
        return self.model.tensors[name].shape

    def tensor(self, name: str) -> Any:
        if self._compressed and self._compressed.is_compressed(name):
            return self._compressed.tensor(name, numpy=self._numpy)
        return self._reader.tensor(name)

    def packed_mask(self, param: str) -> Any:
        if self._compressed:
            packed = self._compressed.packed_mask_array(param)
            if self._numpy:
                return packed
            import torch

            return torch.from_numpy(packed.copy())
        return self._sidecar.packed_mask(param)

    def packed_mask_array(self, param: str) -> np.ndarray:
        with self._lock:  # the compressed decoder keeps per-file state
            if self._compressed:
                return self._compressed.packed_mask_array(param)
            return self._sidecar.packed_mask_array(param)

    def mask(self, param: str) -> torch.Tensor:
        assert self.meta is not None
        return unpack_mask(self.packed_mask_array(param), self.meta.layer(param).shape)

    def dense(self, param: str) -> Any:
        return self._sidecar.dense(param)

    def iter_state(self) -> Iterator[tuple[str, Any]]:
        for name in self.state_names:
            yield name, self.tensor(name)

    def integrity(self, *, shards: bool = True) -> Integrity:
        """The sidecar (and, with ``shards``, every compressed shard) against its recorded content sha256.

        Uncompressed shards are plain HF files and record none. Streamed, torch-free.

        Raises:
            CheckpointError: a file cannot be read.
        """
        results = {SIDECAR: verify_file(self.path / SIDECAR)}
        if shards:
            for file in self.model.files:
                if self.model.headers[file].metadata.get("format") == COMPRESSED_FORMAT:
                    results[file] = verify_file(self.path / file)
        return Integrity.combine(results)

    def pruned_nonzero(self, params: Sequence[str], cancelled: Callable[[], bool] | None = None) -> dict[str, int]:
        """Per pruned parameter: how many of its stored weights are not ``+0.0`` where its mask prunes them.

        Streamed, one tensor at a time and in file order (each shard read front to back, only its
        pruned weights), numpy only (:mod:`nmcli.nm.maskcheck`); compressed weights are decoded first.
        Once ``cancelled()`` says yes (asked between reads), it stops with a partial result. It may
        run on another thread while this one reads packed masks (:meth:`packed_mask_array`).

        Raises:
            CheckpointError: a weight or mask has the wrong size, or a shard cannot be read.
        """

        assert self.meta is not None
        entries = {e.param: e for e in self.meta.layers}
        out: dict[str, int] = {}
        stored = []
        for param in params:
            if cancelled and cancelled():
                return out
            if self._compressed and self._compressed.is_compressed(param):
                with self._lock:
                    weight, packed = self._compressed.bits(param), self._compressed.packed_mask_array(param)
                out[param] = pruned_nonzero(weight.bits, packed)
            elif param not in self.model.tensors:
                raise CheckpointError(f"{self.path}: layer {param} has no tensor in the shards: re-create it")
            else:
                stored.append(self.model.tensors[param])
        for info in sorted(stored, key=lambda t: (self.model.files.index(t.file), t.begin)):
            if cancelled and cancelled():
                return out
            entry = entries[info.name]
            if info.shape != entry.shape:
                raise CheckpointError(
                    f"{self.path / info.file}: tensor {info.name} has shape {info.shape}, its layer entry says {entry.shape}"
                )
            numel = math.prod(info.shape)
            itemsize = info.nbytes // numel if numel else 1
            start = len(self.model.headers[info.file].raw) + info.begin
            out[info.name] = pruned_nonzero_in_file(
                self.path / info.file, start, info.nbytes, itemsize, self.packed_mask_array(info.name), cancelled
            )
        return out

    def load(self, *, dense: bool = True) -> Checkpoint:
        """Read and validate the whole checkpoint into memory, when it fits.

        Raises:
            CheckpointError: unreadable or invalid. InputError: it does not fit in memory.
        """
        assert self.meta is not None
        _check_fits(self.path, self.decoded_bytes)
        try:
            tensors = dict(self.iter_state())
            packed = {name: self.packed_mask(name) for name in self.mask_names}
            dense_tensors = {name: self.dense(name) for name in self.dense_names}
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{self.path} could not be read ({exc}): it may be truncated; re-create it") from exc
        raise_problems(self.path, validate_checkpoint(tensors, packed, dense_tensors, self.meta))
        masks = {e.param: unpack_mask(packed[e.param], e.shape) for e in self.meta.layers}
        return Checkpoint(tensors=tensors, masks=masks, meta=self.meta, dense=dense_tensors if dense else {})


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_fits(path: Path, nbytes: int) -> None:
    """Loading a model whole needs about twice its size (tensors, then the model's copy)."""
    available = _available_memory()
    if available is not None and 2 * nbytes > available:
        raise InputError(
            f"{path} holds {nbytes / 1e9:.1f} GB of weights: loading it whole needs about {2 * nbytes / 1e9:.1f} GB "
            f"and {available / 1e9:.1f} GB is available; this command needs the whole model in memory "
            "(inspect and sad read sharded checkpoints without loading them)"
        )


def shard_count(path: str | os.PathLike[str]) -> int:
    files = weight_files(path)
    return len(files) if files else 0

"""Sharded nmcli/1: Hugging Face model directories larger than memory (DESIGN.md sections 2 and 3c).

Input: a transformers model directory with ``model.safetensors`` or sharded
``model-0000K-of-0000N.safetensors`` + ``model.safetensors.index.json``. The architecture is built
from ``config.json`` with every parameter on the **meta** device (no weights allocated; buffers
computed at construction, such as rotary frequencies, stay real), eligibility is decided from its
modules as usual, and tensors are read from the shards through the safetensors memory map one at
a time (magnitude) or one block at a time (wanda, sparsegpt: the blocks are materialized, calibrated,
written and freed one after the other; everything outside them stays materialized for the run).

Output: a directory that is still a plain HF model directory (the same shard files holding the
same tensor names, dtypes and shapes, with effective weights, exact ``+0.0`` where pruned; the
index rewritten; ``config.json``, tokenizer and other small files copied) plus one sidecar
``nmcli.safetensors`` in the single-file format of :mod:`nmcli.checkpoint` without the state dict:
packed masks, optional dense weights, and the ``nmcli`` metadata, whose source records the sha256
of every input shard. The whole directory is written as ``OUT.tmp-*`` and renamed into place only
when complete; an interrupted prune leaves nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from nmcli.checkpoint import (
    COMPRESSED_FORMAT,
    DENSE_PREFIX,
    FORMAT,
    MASK_PREFIX,
    Checkpoint,
    CheckpointMeta,
    CheckpointReader,
    LayerEntry,
    _raise_problems,
    pack_mask,
    safetensors_header,
    unpack_mask,
    validate_checkpoint,
)
from nmcli.checksum import (
    CHECKSUM_HEADER_BYTES,
    Integrity,
    packed_layout,
    verify_file,
    wants_checksum,
    with_checksum,
)
from nmcli.checksum import finish as finish_checksum
from nmcli.errors import CheckpointError, InputError, OutputExistsError, SourceError
from nmcli.member import check_plain_name, link_outside, member_path, show_name

if TYPE_CHECKING:
    import torch
    from torch import nn

    from nmcli.checkpoint import SourceRef
    from nmcli.compressed_shards import CompressedShards
    from nmcli.data import Batch
    from nmcli.oneshot import CalibrationConfig
    from nmcli.patterns import LayerCandidate, Pattern
    from nmcli.prune import PruneResult

SIDECAR = "nmcli.safetensors"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
LAYOUT = "sharded"  # the sidecar's "layout" metadata entry
# Files of other weight formats are never copied into the output: they would hold the dense weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx", ".gguf", ".pt2")
_WEIGHT_INDEXES = ("pytorch_model.bin.index.json", "tf_model.h5.index.json", "flax_model.msgpack.index.json")
_REOPEN_BYTES = 64 << 20  # a shard's memory map is reopened after this many bytes: RSS stays ~ one tensor
_COPY_CHUNK = 16 << 20
_SIDECAR_STAGE_BYTES = 8 << 20  # a SidecarWriter's staging buffers (masks are small; dense copies stream)
_HEADER_RESERVE = 4096  # header bytes a SidecarWriter reserves by default (a larger header costs a copy)

ProgressCallback = Callable[[int, int, str], None]


# --------------------------------------------------------------------------------------------
# Recognizing directories


def local_directory(spec: str) -> Path | None:
    """The local directory behind ``hf:DIR`` or a bare ``DIR``, or None."""
    path = Path(spec[3:] if spec.startswith("hf:") else spec).expanduser()
    return path if spec and path.is_dir() else None


_INDEX_FIX = "an index names files beside it: re-save the model with save_pretrained(..., safe_serialization=True)"


def weight_files(folder: str | os.PathLike[str]) -> list[str] | None:
    """The safetensors weight files of an HF model directory, in index order, or None when it has none.

    Every name is a plain file inside ``folder`` (:func:`nmcli.member.member_path`), checked before
    any shard is opened: a name with ``..``, an absolute path, a symlink out, a FIFO or a device is exit 2.

    Raises:
        SourceError: the index is unreadable, or names a file outside the directory or not a regular file.
    """
    root = Path(folder)
    if (root / INDEX).is_file():
        index = member_path(root, INDEX, source=root, entry="the shard index", fix=_INDEX_FIX, error=SourceError)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            items = list(weight_map.items())
        except Exception as exc:  # malformed JSON or no weight_map: the same user problem
            raise SourceError(f"{index} is not a readable safetensors index ({exc}): re-save the model") from exc
        files: set[str] = set()
        for tensor, file in items:
            if isinstance(file, str) and file in files:
                continue
            entry = f"weight_map[{show_name(tensor)}]"
            member_path(root, file, source=index, entry=entry, fix=_INDEX_FIX, error=SourceError)
            if file in (INDEX, SIDECAR):
                raise SourceError(f"{index}: {entry} names {file}, which is not a shard: {_INDEX_FIX}")
            files.add(file)
        return sorted(files)
    if (root / SINGLE).is_file():
        member_path(root, SINGLE, source=root, entry="the weights file", fix=_INDEX_FIX, error=SourceError)
        return [SINGLE]
    return None


def check_hf_directory(folder: str | os.PathLike[str]) -> None:
    """Check every file name an HF directory's indexes hold (safetensors and other formats) before it is loaded.

    Raises:
        SourceError: an index names a file outside the directory, or one that is not a regular file.
    """
    root = Path(folder)
    weight_files(root)
    for name in _WEIGHT_INDEXES:
        if not (root / name).is_file():
            continue
        index = member_path(root, name, source=root, entry="a weight index", fix=_INDEX_FIX, error=SourceError)
        try:
            items = list(json.loads(index.read_text())["weight_map"].items())
        except Exception as exc:
            raise SourceError(f"{index} is not a readable weight index ({exc}): re-save the model") from exc
        for tensor, file in items:
            entry = f"weight_map[{show_name(tensor)}]"
            member_path(root, file, source=index, entry=entry, fix=_INDEX_FIX, error=SourceError)
    side_files(root)


def is_hf_directory(path: str | os.PathLike[str]) -> bool:
    """A directory with ``config.json`` and safetensors weights (single file or sharded)."""
    root = Path(path)
    return root.is_dir() and (root / "config.json").is_file() and weight_files(root) is not None


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    """A directory written by nmcli in the sharded layout (it holds the ``nmcli.safetensors`` sidecar)."""
    return Path(path).is_dir() and (Path(path) / SIDECAR).is_file()


def sidecar_path(folder: str | os.PathLike[str]) -> Path:
    """The ``nmcli.safetensors`` sidecar of a sharded checkpoint directory.

    Raises:
        CheckpointError: it is a symlink out of the directory, or not a regular file.
    """
    fix = "re-create the directory with nmcli prune"
    return member_path(folder, SIDECAR, source=folder, entry="the sidecar", fix=fix, error=CheckpointError)


# --------------------------------------------------------------------------------------------
# Shard headers (plain JSON: no torch, no numpy)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shard file, dtype code, shape and byte range in the data section."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class ShardHeader:
    """A safetensors file's header: its raw bytes (size prefix included), metadata and tensors by offset."""

    raw: bytes
    metadata: dict[str, str]
    tensors: list[TensorInfo]


def read_header(path: str | os.PathLike[str], file: str | None = None) -> ShardHeader:
    """Parse the header of a safetensors file.

    Raises:
        CheckpointError: the file is missing, truncated or not safetensors.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("shorter than 8 bytes")
            (size,) = struct.unpack("<Q", head)
            if size > 100 << 20:
                raise ValueError(f"header of {size} bytes")
            blob = fh.read(size)
            if len(blob) != size:
                raise ValueError("truncated header")
        header = json.loads(blob)
        metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        tensors = [
            TensorInfo(
                name,
                file or path.name,
                str(v["dtype"]),
                tuple(int(d) for d in v["shape"]),
                *map(int, v["data_offsets"]),
            )
            for name, v in header.items()
        ]
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist: the model directory is incomplete; re-save it") from None
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}): it may be truncated; re-save it"
        ) from exc
    tensors.sort(key=lambda t: t.begin)
    return ShardHeader(head + blob, metadata, tensors)


@dataclass
class ShardedModel:
    """The safetensors weights of an HF model directory: every tensor and which shard holds it."""

    folder: Path
    files: list[str]
    headers: dict[str, ShardHeader]
    tensors: dict[str, TensorInfo]
    index_metadata: dict[str, Any]

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> ShardedModel:
        """Read the index and every shard's header (no tensor is read).

        Every file name the index holds is checked first (:func:`weight_files`).

        Raises:
            SourceError: the directory holds no safetensors weights; its index names a file outside it or
                not a regular file; a file in it links out of it.
            CheckpointError: a shard is missing or unreadable, or a tensor is in two shards.
        """
        root = Path(folder)
        files = weight_files(root)
        if files is None:
            raise SourceError(
                f"{root} holds no safetensors weights ({SINGLE} or {INDEX}): save the model with "
                "save_pretrained(..., safe_serialization=True)"
            )
        side_files(root)  # a link out of the directory is refused before any file is read
        index_meta: dict[str, Any] = {}
        if (root / INDEX).is_file():
            index_meta = dict(json.loads((root / INDEX).read_text()).get("metadata") or {})
        headers = {f: read_header(root / f, f) for f in files}
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            for info in headers[f].tensors:
                if info.name in tensors:
                    raise CheckpointError(
                        f"{root}: tensor {info.name} is stored in both {tensors[info.name].file} and {f}"
                    )
                tensors[info.name] = info
        return cls(root, files, headers, tensors, index_meta)

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())


class ShardReader:
    """Tensors of a :class:`ShardedModel`, read one at a time through safetensors' memory map.

    A shard's map is closed and reopened after ``_REOPEN_BYTES`` read from it, so the pages already
    read leave the process (its RSS stays near one tensor, not one shard).
    """

    def __init__(self, model: ShardedModel, *, numpy: bool = False) -> None:
        self.model = model
        self._framework = "numpy" if numpy else "pt"
        self._file: str | None = None
        self._handle: Any = None
        self._open: Any = None
        self._read = 0

    def _handle_for(self, file: str) -> Any:
        if self._file != file or self._read > _REOPEN_BYTES:
            self.close()
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(self.model.folder / file), framework=self._framework)
                self._open = self._handle.__enter__()
            except Exception as exc:
                raise CheckpointError(
                    f"{self.model.folder / file} is not a readable safetensors file ({exc}): re-save the model"
                ) from exc
            self._file, self._read = file, 0
        return self._open

    def tensor(self, name: str) -> Any:
        info = self.model.tensors[name]
        handle = self._handle_for(info.file)
        try:
            value = handle.get_tensor(name)
        except Exception as exc:
            raise CheckpointError(
                f"{self.model.folder / info.file}: tensor {name} could not be read ({exc}): the shard may be truncated"
            ) from exc
        self._read += info.nbytes
        return value

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle = self._open = self._file = None

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _raw_bytes(value: torch.Tensor) -> memoryview:
    import torch

    flat = value.detach().reshape(-1).contiguous()
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


# --------------------------------------------------------------------------------------------
# Writing: output shards, the sidecar, and the atomic directory


class OutputShards:
    """The output shards: the input's files, names, dtypes and shapes, filled tensor by tensor in any order.

    Every file is created at its full size with its header up front; :meth:`put` writes one
    tensor's bytes at its offset, so tensors can be written as soon as they are final (magnitude:
    in file order; calibrated: block by block).
    """

    def __init__(self, source: ShardedModel, folder: Path) -> None:
        self._infos = source.tensors
        self._folder = folder
        self._starts: dict[str, int] = {}
        self._handles: dict[str, Any] = {}
        self._pending = set(source.tensors)
        for file in source.files:
            header = source.headers[file]
            entries = [(t.name, t.dtype, t.shape, t.nbytes) for t in header.tensors]
            blob = safetensors_header(entries, header.metadata)
            fh = open(folder / file, "wb")  # noqa: SIM115 - closed in close()
            fh.write(blob)
            fh.truncate(len(blob) + sum(t.nbytes for t in header.tensors))
            self._handles[file] = fh
            self._starts[file] = len(blob)

    def put(self, name: str, value: torch.Tensor) -> None:
        info = self._infos[name]
        data = _raw_bytes(value.to("cpu"))
        if data.nbytes != info.nbytes:
            raise CheckpointError(
                f"tensor {name}: {data.nbytes} bytes to write where the shard holds {info.nbytes} (a bug)"
            )
        fh = self._handles[info.file]
        fh.seek(self._starts[info.file] + info.begin)
        fh.write(data)
        self._pending.discard(name)

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def finish(self) -> None:
        """Close every file; every tensor must have been written."""
        self.close()
        if self._pending:
            raise CheckpointError(
                f"{len(self._pending)} tensor(s) were never written, e.g. {sorted(self._pending)[0]} (a bug)"
            )


class SidecarWriter:
    """A safetensors file whose tensors arrive one by one (the ``nmcli.safetensors`` sidecar, compressed shards).

    The data section streams to disk through :class:`_SequentialFile` behind a header region
    reserved up front; :meth:`finish` writes the header into it, padded with spaces (the format
    allows trailing whitespace in the header), so the data is written once. A header larger than
    the reservation goes in front of a copy of the data instead.

    The data is hashed on the writer's thread as it goes out (no second read, no extra memory);
    :meth:`finish` records the content checksum of :mod:`nmcli.checksum` when the metadata is of an
    nmcli format (the reservation includes room for it).
    """

    def __init__(self, path: Path, reserve: int = _HEADER_RESERVE) -> None:
        self.path = path
        self._reserve = -(-(reserve + CHECKSUM_HEADER_BYTES) // 8) * 8
        self._file = _SequentialFile(path, _SIDECAR_STAGE_BYTES, hash_from=8 + self._reserve)
        self._file.write(bytes(8 + self._reserve))
        self._entries: list[tuple[str, str, tuple[int, ...], int]] = []
        self._open: tuple[str, str, tuple[int, ...], int] | None = None

    def add(self, name: str, value: torch.Tensor) -> None:
        from nmcli.checkpoint import safetensors_dtype

        code = safetensors_dtype(value.dtype)
        if code is None:
            raise CheckpointError(f"tensor {name} has dtype {value.dtype}, which safetensors cannot store")
        data = _raw_bytes(value.to("cpu"))
        self._file.write(data)
        self._entries.append((name, code, tuple(value.shape), data.nbytes))

    def begin(self, name: str, dtype: torch.dtype, shape: Sequence[int]) -> None:
        """Start a tensor whose bytes come in pieces (:meth:`extend`), ended by :meth:`end`."""
        from nmcli.checkpoint import safetensors_dtype

        code = safetensors_dtype(dtype)
        if code is None:
            raise CheckpointError(f"tensor {name} has dtype {dtype}, which safetensors cannot store")
        self._open = (name, code, tuple(int(d) for d in shape), self._file.size)

    def extend(self, data: Any) -> None:
        self._file.write(data)

    def end(self) -> None:
        assert self._open is not None
        name, code, shape, start = self._open
        self._entries.append((name, code, shape, self._file.size - start))
        self._open = None

    def finish(self, metadata: Mapping[str, str]) -> None:
        """Write what is buffered and the header (with the content checksum for an nmcli format)."""
        self._file.finish()
        if wants_checksum(metadata):
            data_length = self._file.size - 8 - self._reserve
            checksum = finish_checksum(self._file.digest, data_length, packed_layout(self._entries), metadata)
            metadata = with_checksum(metadata, checksum)
        body = safetensors_header(self._entries, metadata)[8:].rstrip(b" ")
        if len(body) <= self._reserve:
            with open(self.path, "r+b") as fh:
                fh.write(struct.pack("<Q", self._reserve) + body + b" " * (self._reserve - len(body)))
            return
        spilled = self.path.with_name(f".{self.path.name}.data")
        self.path.rename(spilled)
        with open(self.path, "wb") as out, open(spilled, "rb") as data:
            out.write(safetensors_header(self._entries, metadata))
            data.seek(8 + self._reserve)
            shutil.copyfileobj(data, out, _COPY_CHUNK)
        spilled.unlink()

    def close(self) -> None:
        self._file.close()


# --------------------------------------------------------------------------------------------
# Streaming magnitude prune: a shard mapped read-only, hashed ahead on another thread, written
# through an aligned, double-buffered O_DIRECT writer


_STAGE_BYTES = 32 << 20  # one staging buffer of the output writer (two of them alternate)
_DIRECT_ALIGN = 4096  # O_DIRECT offsets, sizes and buffer addresses are multiples of this
_STREAM_PIECE = 16 << 20  # a shard is read in pieces of this size
_STREAM_RING = 8  # pieces in flight between the reading thread and the prune
_READ_AHEAD = 256 << 20  # the kernel is asked to read this far ahead of the reading thread
_STREAM_GROUPS = 1 << 16  # groups of m per slice of the streamed mask


class _ShardStream:
    """A file read front to back by a thread into a ring of buffers and hashed on the way; the
    prune takes its bytes in order from the same buffers.

    The reading thread does the I/O (the kernel reading ahead on a ``POSIX_FADV_WILLNEED`` hint)
    and the sha256 (``hashlib`` releases the GIL), the main thread only computes: no page faults on
    a memory map (cold faults ran at ~50 MB/s here, warm ones still cost a fault per 4 KiB), no
    second read, and memory fixed at ``_STREAM_RING`` pieces of ``_STREAM_PIECE`` bytes.
    """

    def __init__(self, path: Path) -> None:
        import queue
        import threading

        self.path = path
        self._pieces = [bytearray(_STREAM_PIECE) for _ in range(_STREAM_RING)]
        self._free: queue.Queue[int] = queue.Queue()
        self._full: queue.Queue[tuple[int, int] | None] = queue.Queue()
        for index in range(_STREAM_RING):
            self._free.put(index)
        self._digest = hashlib.sha256()
        self._error: OSError | None = None
        self._stop = False
        self._current: tuple[int, int] | None = None  # (piece index, bytes in it) being consumed
        self._position = 0  # consumed bytes of the current piece
        self._ended = False
        self._scratch = bytearray(0)
        self._thread = threading.Thread(target=self._run, name=f"read {path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with open(self.path, "rb", buffering=0) as fh:
                offset = 0
                while True:
                    index = self._free.get()
                    if self._stop:
                        return
                    with contextlib.suppress(AttributeError, OSError):
                        os.posix_fadvise(fh.fileno(), offset, _READ_AHEAD, os.POSIX_FADV_WILLNEED)
                    view = memoryview(self._pieces[index])
                    count = 0
                    while count < _STREAM_PIECE:  # whole pieces: a short read is not the end of the file
                        got = fh.readinto(view[count:])
                        if not got:
                            break
                        count += got
                    if count:
                        self._digest.update(view[:count])
                        offset += count
                        self._full.put((index, count))
                    if count < _STREAM_PIECE:
                        return
        except OSError as exc:  # reported to the consumer by take() and hexdigest()
            self._error = exc
        finally:
            self._full.put(None)

    def _next_piece(self) -> bool:
        if self._current is not None:
            self._free.put(self._current[0])
            self._current = None
        if self._ended:
            return False
        item = self._full.get()
        if item is None:
            self._ended = True
            if self._error is not None:
                raise CheckpointError(f"{self.path} could not be read ({self._error})") from self._error
            return False
        self._current, self._position = item, 0
        return True

    def take(self, nbytes: int) -> memoryview:
        """The next ``nbytes`` of the file, valid until the next call.

        Raises:
            CheckpointError: the file ends first (truncated) or cannot be read.
        """
        if self._current is not None and self._position + nbytes <= self._current[1]:
            start = self._position
            self._position += nbytes
            return memoryview(self._pieces[self._current[0]])[start : start + nbytes]
        if len(self._scratch) < nbytes:  # the range straddles pieces: assembled in a scratch buffer
            self._scratch = bytearray(nbytes)
        out = memoryview(self._scratch)[:nbytes]
        filled = 0
        while filled < nbytes:
            if self._current is None or self._position == self._current[1]:
                if not self._next_piece():
                    raise CheckpointError(
                        f"{self.path} ends before its header says it should: it is truncated; re-save it"
                    )
                continue
            assert self._current is not None
            step = min(nbytes - filled, self._current[1] - self._position)
            out[filled : filled + step] = memoryview(self._pieces[self._current[0]])[
                self._position : self._position + step
            ]
            filled += step
            self._position += step
        return out

    def skip(self, nbytes: int) -> None:
        """Consume ``nbytes`` without using them (the header, gaps between tensors)."""
        while nbytes:
            step = min(nbytes, _STREAM_PIECE)
            self.take(step)
            nbytes -= step

    def hexdigest(self) -> str:
        """The whole file's sha256, once the rest of it (if any) is read."""
        while self._next_piece():
            pass
        self._thread.join()
        if self._error is not None:
            raise CheckpointError(f"{self.path} could not be read ({self._error})") from self._error
        return self._digest.hexdigest()

    def cancel(self) -> None:
        self._stop = True
        self._free.put(0)
        while not self._ended:  # unblock a reader waiting for a free piece
            item = self._full.get()
            if item is None:
                self._ended = True
            else:
                self._free.put(item[0])
        self._thread.join()


class _SequentialFile:
    """A file written front to back through two aligned staging buffers and one writer thread.

    Writes go out with ``O_DIRECT`` where the file system takes it (virtualized disks spend most of
    a buffered write's CPU in the page cache; the prune's CPU is needed for the masks), else
    buffered. The last, partial block is padded, written, and the file truncated to its length.
    """

    def __init__(self, path: Path, stage_bytes: int | None = None, *, hash_from: int | None = None) -> None:
        import mmap
        from concurrent.futures import ThreadPoolExecutor

        self.path = path
        # bytes from offset hash_from on are hashed on the writing thread, in order (digest)
        self._hash_from = hash_from
        self.digest = hashlib.sha256() if hash_from is not None else None
        self._stage = stage_bytes or _STAGE_BYTES
        self._direct = hasattr(os, "O_DIRECT")
        self._fd = self._open(direct=self._direct)
        self._buffers = [mmap.mmap(-1, self._stage) for _ in range(2)]  # anonymous maps: page-aligned
        self._pending: list[Any] = [None, None]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"write {path.name}")
        self._current = 0
        self._fill = 0
        self._offset = 0  # file offset of the current buffer
        self.size = 0

    def _open(self, *, direct: bool) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
        try:
            return os.open(self.path, flags, 0o644)
        except OSError:
            if not direct:
                raise
            self._direct = False
            return os.open(self.path, flags & ~os.O_DIRECT, 0o644)

    def _pwrite(self, view: memoryview, offset: int, hashed: memoryview | None = None) -> None:
        if hashed is not None and self.digest is not None:
            self.digest.update(hashed)
        try:
            written = os.pwrite(self._fd, view, offset)
        except OSError as exc:
            if not self._direct or exc.errno != 22:  # EINVAL: the file system refuses direct I/O
                raise
            os.close(self._fd)
            self._direct = False
            self._fd = os.open(self.path, os.O_WRONLY)
            written = os.pwrite(self._fd, view, offset)
        while written < len(view):  # short writes (signals, quotas) continue where they stopped
            written += os.pwrite(self._fd, view[written:], offset + written)

    def _flush(self, length: int, filled: int | None = None) -> None:
        buffer = memoryview(self._buffers[self._current])[:length]
        hashed = None
        if self._hash_from is not None:  # the written bytes at or after hash_from (not the padding)
            end = length if filled is None else filled
            hashed = buffer[min(end, max(0, self._hash_from - self._offset)) : end]
        self._pending[self._current] = self._pool.submit(self._pwrite, buffer, self._offset, hashed)
        self._offset += length
        self._current ^= 1
        self._fill = 0
        waiting = self._pending[self._current]
        if waiting is not None:
            waiting.result()
            self._pending[self._current] = None

    def write(self, data: Any) -> None:
        """Append ``data`` (any buffer)."""
        source = memoryview(data).cast("B")
        self.size += len(source)
        while len(source):
            take = min(len(source), self._stage - self._fill)
            self._buffers[self._current][self._fill : self._fill + take] = source[:take]
            self._fill += take
            source = source[take:]
            if self._fill == self._stage:
                self._flush(self._stage)

    def reserve(self, nbytes: int, align: int) -> memoryview | None:
        """The next ``nbytes`` of the current staging buffer, to be filled in place and then :meth:`commit`-ted.

        None when they do not fit in it or the position is not a multiple of ``align``: use :meth:`write`.
        """
        if self._fill % align or self._fill + nbytes > self._stage:
            return None
        return memoryview(self._buffers[self._current])[self._fill : self._fill + nbytes]

    def commit(self, nbytes: int) -> None:
        """The ``nbytes`` given by :meth:`reserve` are filled."""
        self._fill += nbytes
        self.size += nbytes
        if self._fill == self._stage:
            self._flush(self._stage)

    def finish(self) -> None:
        """Write what is buffered and close; the file then holds exactly the bytes written."""
        if self._fill:
            padded = -(-self._fill // _DIRECT_ALIGN) * _DIRECT_ALIGN
            self._buffers[self._current][self._fill : padded] = bytes(padded - self._fill)
            self._flush(padded, self._fill)
        for future in self._pending:
            if future is not None:
                future.result()
        self._pending = [None, None]
        os.ftruncate(self._fd, self.size)
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._pending = [None, None]
        for buffer in self._buffers:
            with contextlib.suppress(BufferError):  # a view still alive: the map is freed when it is collected
                buffer.close()
        self._buffers = []


def check_output_directory(
    out: str | os.PathLike[str], *, force: bool, inputs: Sequence[str | os.PathLike[str]] = ()
) -> Path:
    """Validate an output directory before any work.

    Raises:
        OutputExistsError: it is (or holds, or sits inside) an input; it exists without ``force``;
            it exists and is not an nmcli sharded checkpoint (never replaced, even with ``force``);
            its folder is missing or not writable; it exists and is not a directory (device, FIFO: even
            with ``force``).
        OutputWriteError: its name is longer than the file system allows.
    """
    from nmcli.io import check_name_length, check_not_special, check_output_writable

    path = Path(out)
    check_name_length(path)
    resolved = path.resolve()
    for inp in inputs:
        source = Path(inp).resolve()
        if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
            raise OutputExistsError(
                f"output {path} is, holds or sits inside the input {inp}: nmcli never overwrites an input; choose another -o"
            )
    check_not_special(path, directory=True)
    if path.exists() or path.is_symlink():
        if not force:
            raise OutputExistsError(f"output {path} already exists: pass --force to overwrite it, or choose another -o")
        if not is_sharded_checkpoint(path):
            raise OutputExistsError(
                f"output {path} exists and is not an nmcli sharded checkpoint (no {SIDECAR}): nmcli replaces only "
                "its own outputs, even with --force; choose another -o"
            )
    check_output_writable(path)
    return path


@contextlib.contextmanager
def atomic_directory(
    out: str | os.PathLike[str], *, force: bool, inputs: Sequence[str | os.PathLike[str]] = ()
) -> Iterator[Path]:
    """Yield a fresh ``OUT.tmp-*`` directory beside ``out``; rename it onto ``out`` when the block succeeds.

    On any failure (Ctrl-C, SIGTERM and SIGHUP included) the temporary directory is removed; an
    existing ``out`` (``force``) is moved aside, replaced, and only then deleted.

    Raises:
        OutputExistsError: see :func:`check_output_directory`.
        OutputWriteError: the OS refused to write into it (no space, quota, permission, ...), here or
            in the block; the message names ``out``, not the temporary directory.
    """
    from nmcli.io import check_not_special, temp_prefix, writing

    path = check_output_directory(out, force=force, inputs=inputs)
    stem = temp_prefix(path)[1:-1]
    with writing(path):
        tmp = Path(tempfile.mkdtemp(prefix=f"{stem}.tmp-", dir=path.parent))
        try:
            yield tmp
            check_not_special(path, directory=True)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            old = None
            if path.exists():
                old = path.with_name(f"{stem}.old-{uuid.uuid4().hex[:8]}")
                os.rename(path, old)
            os.rename(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def side_files(source: Path) -> list[str]:
    """The config, tokenizer and other small files (and folders) of an HF directory that an output copies.

    Never weights, indexes, the sidecar or hidden files; FIFOs, devices and sockets are left out.

    Raises:
        SourceError: a file or folder in it (at any depth) is a symlink that leads out of ``source``.
    """
    names = []
    for entry in sorted(source.iterdir()):
        name = entry.name
        if name.startswith(".") or name in (INDEX, SIDECAR, *_WEIGHT_INDEXES) or name.endswith(_WEIGHT_SUFFIXES):
            continue
        _check_links(source, entry)
        if entry.is_dir() and not entry.is_symlink():
            for below, dirs, files in os.walk(entry):
                for other in (*dirs, *files):
                    _check_links(source, Path(below) / other)
        if entry.is_file() or (entry.is_dir() and not entry.is_symlink()):
            names.append(name)
    return names


def _check_links(source: Path, path: Path) -> None:
    target = link_outside(source, path)
    if target is not None:
        raise SourceError(
            f"{source}: {path.relative_to(source)} is a symlink to {target}, outside the directory: nmcli reads "
            "nothing outside a model directory; replace the link with the file itself"
        )


def copy_side_files(source: Path, dest: Path) -> list[str]:
    """Copy :func:`side_files` of ``source`` into ``dest``; folders without weights, links or special files."""
    copied = side_files(source)
    for name in copied:
        if (source / name).is_dir():
            _copy_folder(source / name, dest / name)
        else:
            shutil.copy2(source / name, dest / name)
    return copied


def _copy_folder(source: Path, dest: Path) -> None:
    dest.mkdir()
    for entry in sorted(source.iterdir()):
        if entry.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if entry.is_dir() and not entry.is_symlink():
            _copy_folder(entry, dest / entry.name)
        elif entry.is_file():  # a regular file, or a link to one inside the model directory (side_files)
            shutil.copy2(entry, dest / entry.name)


def write_index(source: ShardedModel, dest: Path) -> None:
    """``model.safetensors.index.json`` for a sharded output (the input's, with its total size)."""
    if source.files == [SINGLE] and not (source.folder / INDEX).is_file():
        return
    metadata = dict(source.index_metadata)
    metadata["total_size"] = source.total_bytes
    weight_map = {name: source.tensors[name].file for name in sorted(source.tensors)}
    (dest / INDEX).write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# The meta-device skeleton


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every ``nn.Parameter`` registered inside the block is created on the meta device (buffers stay real)."""
    from torch import nn

    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            moved = self._parameters[name]
            assert moved is not None
            self._parameters[name] = type(moved)(moved.to("meta"), requires_grad=moved.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_skeleton(folder: Path) -> nn.Module:
    """The architecture of an HF directory from its ``config.json``, parameters on the meta device, eval mode."""
    from nmcli.sources import build_model

    with parameters_on_meta():
        model, _ = build_model(f"hf:{folder}", pretrained=False)
    return model.eval()


def file_keys(model: nn.Module, stored: Mapping[str, Any]) -> dict[str, str]:
    """Each parameter and persistent buffer of ``model`` -> its name in the files (``base_model_prefix`` either way).

    Tied parameters (one tensor under two names) map once, under the name the files hold.
    """
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers() if n in model.state_dict()]
    mapping: dict[str, str] = {}
    for name in names:
        for key in (name, f"{prefix}.{name}", name[len(prefix) + 1 :] if name.startswith(prefix + ".") else None):
            if key and key in stored:
                mapping[name] = key
                break
    return mapping


# --------------------------------------------------------------------------------------------
# Pruning a directory


@dataclass
class _Plan:
    source: ShardedModel
    model: nn.Module
    candidates: list[LayerCandidate]
    keys: dict[str, str]  # model name -> file name
    eligible: dict[str, LayerCandidate]  # file name -> candidate


def _plan(
    folder: Path, pattern: Pattern, include: Sequence[str], exclude: Sequence[str], skeleton: nn.Module | None = None
) -> _Plan:
    from nmcli.patterns import LayerCandidate, find_layers

    source = ShardedModel.open(folder)
    model = skeleton if skeleton is not None else build_skeleton(folder)
    keys = file_keys(model, source.tensors)
    missing = [n for n, _ in model.named_parameters() if n not in keys]
    if missing:
        raise SourceError(
            f"{folder}: the weights do not fit the architecture of its config.json (missing "
            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): re-save the model with save_pretrained"
        )
    candidates = []
    eligible: dict[str, LayerCandidate] = {}
    for cand in find_layers(model, pattern, include, exclude):
        if cand.eligible and (cand.param not in keys or keys[cand.param] in eligible):
            cand = LayerCandidate(
                cand.module, cand.param, cand.kind, cand.shape, cand.axis, False, "tied to another weight, left dense"
            )
        if cand.eligible:
            info = source.tensors[keys[cand.param]]
            if info.shape != cand.shape:
                raise SourceError(f"{folder}: {info.name} has shape {info.shape}, the architecture says {cand.shape}")
            eligible[keys[cand.param]] = cand
        candidates.append(cand)
    return _Plan(source, model, candidates, keys, eligible)


def _no_layer_error(spec: str, pattern: Pattern, candidates: Sequence[LayerCandidate]) -> InputError:
    reasons = "; ".join(sorted({c.reason for c in candidates})) or "it has no Linear, Conv or attention layers"
    return InputError(f"no layer of {spec} can be pruned to {pattern}: {reasons}")


class _Progress:
    """``progress(MiB done, MiB total, label)`` with the throughput in the label."""

    def __init__(self, callback: ProgressCallback | None, total_bytes: int) -> None:
        self.callback, self.total, self.done, self.start = callback, total_bytes, 0, time.perf_counter()

    def advance(self, nbytes: int, label: str) -> None:
        self.done += nbytes
        if self.callback is None:
            return
        rate = self.done / max(time.perf_counter() - self.start, 1e-9) / 1e6
        self.callback(self.done >> 20, max(self.total >> 20, 1), f"{label} {rate:,.0f} MB/s")


def prune_directory(
    spec: str,
    folder: Path,
    out: Path,
    pattern: Pattern,
    *,
    source: SourceRef,
    method: str = "magnitude",
    calibration: CalibrationConfig | None = None,
    batches: Sequence[Batch] | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    keep_dense: bool = False,
    input_spec: str | None = None,
    history_args: dict[str, Any] | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
    skeleton: nn.Module | None = None,
) -> PruneResult:
    """Prune the HF directory ``folder`` into the sharded checkpoint directory ``out`` without loading it whole.

    ``skeleton`` is the caller's :func:`build_skeleton` of ``folder``, when it has built one already.

    Magnitude reads, prunes and writes one tensor at a time, and hashes every shard on the same
    read; wanda and sparsegpt (``batches``) go block by block (:func:`_calibrated`). Masks and
    effective weights equal those of the in-memory path.

    Raises:
        InputError: nothing can be pruned; a calibrated method on a model without repeated blocks or
            with BatchNorm (those are loaded whole: ``-o FILE.safetensors``).
        SourceError/CheckpointError: unreadable or inconsistent inputs.
        OutputExistsError: ``out`` exists without ``force``, or is an input.
    """
    from nmcli.checkpoint import history_record
    from nmcli.prune import LayerReport, PruneResult

    if (batches is None) != (method == "magnitude"):
        raise InputError(f"--method {method} on {spec}: calibration batches are needed for wanda and sparsegpt only")
    plan = _plan(folder, pattern, include, exclude, skeleton)
    if not plan.eligible:
        raise _no_layer_error(spec, pattern, plan.candidates)
    outcomes: dict[str, _Outcome] = {}
    notes: list[str] = []
    with atomic_directory(out, force=force, inputs=[folder]) as tmp:
        copy_side_files(folder, tmp)
        shards = OutputShards(plan.source, tmp) if batches is not None else None
        sidecar = SidecarWriter(tmp / SIDECAR, reserve=16384 + 1024 * len(plan.candidates))
        try:
            if shards is not None and batches is not None:
                from nmcli.oneshot import CalibrationConfig

                cfg = calibration or CalibrationConfig(spec="")
                hashes = _calibrated(
                    plan, pattern, method, cfg, batches, shards, sidecar, keep_dense, outcomes, notes, progress
                )
                shards.finish()
            else:
                hashes = _magnitude(plan, pattern, tmp, sidecar, keep_dense, outcomes, progress)
            write_index(plan.source, tmp)
            reports, entries, pruned = [], [], 0
            for cand in plan.candidates:
                if not cand.eligible:
                    reports.append(LayerReport(cand.module, cand.param, cand.shape, "skipped", cand.reason, None))
                    continue
                key = plan.keys[cand.param]
                o = outcomes[key]
                pruned += o.pruned
                entries.append(LayerEntry(key, cand.module, pattern.n, pattern.m, cand.axis, cand.shape))
                reports.append(LayerReport(cand.module, key, cand.shape, "pruned", "", o.kept, o.recon_error, o.note))
            params_total = sum(p.numel() for p in plan.model.parameters())
            samples = sum(b.size for b in batches) if batches is not None else 0
            metrics: dict[str, Any] = {
                "layers_pruned": len(entries),
                "params_pruned": pruned,
                "sparsity": pruned / params_total if params_total else 0.0,
                "layout": LAYOUT,
            }
            if batches is not None:
                errors = [r.recon_error for r in reports if r.recon_error is not None]
                metrics.update(
                    {
                        "calib_samples": samples,
                        "mean_recon_error": sum(errors) / len(errors) if errors else None,
                    }
                )
            from dataclasses import replace

            ref = replace(source, shards=tuple((f, hashes[f]) for f in plan.source.files))
            meta = CheckpointMeta(
                source=ref,
                pattern=pattern,
                layers=entries,
                input_spec=input_spec,
                history=[history_record("prune", history_args or {"pattern": str(pattern), "method": method}, metrics)],
                method=method,
            )
            sidecar.finish(sidecar_metadata(meta))
        finally:
            if shards is not None:
                shards.close()
            sidecar.close()
    ckpt = Checkpoint(tensors={}, masks={}, meta=meta)
    result = PruneResult(ckpt, pattern, method, reports, params_total, pruned, out, notes, False, samples)
    return result


def sidecar_metadata(meta: CheckpointMeta) -> dict[str, str]:
    return {"format": FORMAT, "layout": LAYOUT, "nmcli": json.dumps(meta.to_json(), separators=(",", ":"))}


@dataclass
class _Outcome:
    kept: float
    pruned: int
    recon_error: float | None = None
    note: str = ""


def _l1(value: torch.Tensor) -> float:
    from nmcli.patterns import l1_norm

    return l1_norm(value)


def finish_layer(
    name: str,
    cand: LayerCandidate,
    pattern: Pattern,
    original: torch.Tensor,
    effective: torch.Tensor,
    mask: torch.Tensor,
    dense: torch.Tensor | None,
    sidecar: SidecarWriter,
    outcomes: dict[str, _Outcome],
    *,
    recon_error: float | None = None,
    note: str = "",
) -> None:
    """Validate one pruned layer with the format's own checks and spool its packed mask (and dense weights)."""
    entry = LayerEntry(name, cand.module, pattern.n, pattern.m, cand.axis, cand.shape)
    packed = pack_mask(mask)
    from nmcli.checkpoint import SourceRef

    one = CheckpointMeta(source=SourceRef(spec=""), layers=[entry])
    _raise_problems(name, validate_checkpoint({name: effective}, {name: packed}, {}, one))
    sidecar.add(MASK_PREFIX + name, packed)
    if dense is not None:
        sidecar.add(DENSE_PREFIX + name, dense)
    total = _l1(original)
    kept = _l1(effective) / total if total > 0 else 1.0
    from nmcli.patterns import count_kept

    outcomes[name] = _Outcome(kept, int(mask.numel()) - count_kept(mask), recon_error, note)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """One torch thread inside: the reading thread has the other core (measured on 2 cores: 3.0 s
    against 4.4 s with two torch threads for 1.3 GB; OpenMP ops slow down badly on a busy core)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _magnitude(
    plan: _Plan,
    pattern: Pattern,
    folder: Path,
    sidecar: SidecarWriter,
    keep_dense: bool,
    outcomes: dict[str, _Outcome],
    progress: ProgressCallback | None,
) -> dict[str, str]:
    """Magnitude prune, shard by shard in file order; returns the sha256 of every input shard.

    Each shard is streamed once: tensors in file order, pruned weights in slices of
    groups (:func:`_prune_streamed`), everything written front to back into the output shard of the
    same name (:class:`_SequentialFile`), while :class:`_ShardStream` reads and hashes the file on
    another thread. Memory stays at the read pieces plus one layer's packed mask, whatever the shard's size.
    """
    from nmcli.checkpoint import torch_dtype

    source = plan.source
    bar = _Progress(progress, source.total_bytes)
    hashes: dict[str, str] = {}
    with _one_torch_thread():
        for number, file in enumerate(source.files, 1):
            header = source.headers[file]
            stream = _ShardStream(source.folder / file)
            writer: _SequentialFile | None = None
            try:
                writer = _SequentialFile(folder / file)
                entries = [(t.name, t.dtype, t.shape, t.nbytes) for t in header.tensors]
                writer.write(safetensors_header(entries, header.metadata))
                stream.skip(len(header.raw))
                position = 0  # in the data section
                for info in header.tensors:
                    stream.skip(info.begin - position)  # a gap some writers leave
                    position = info.end
                    cand = plan.eligible.get(info.name)
                    if cand is None:
                        for start in range(0, info.nbytes, _STREAM_PIECE):
                            writer.write(stream.take(min(_STREAM_PIECE, info.nbytes - start)))
                    else:
                        dtype = torch_dtype(info.dtype)
                        _prune_streamed(info, cand, dtype, stream, pattern, writer, sidecar, keep_dense, outcomes)
                    bar.advance(info.nbytes, f"shard {number}/{len(source.files)}")
                writer.finish()
                hashes[file] = stream.hexdigest()
            except BaseException:
                stream.cancel()
                raise
            finally:
                if writer is not None:
                    writer.close()
    return hashes


def _prune_streamed(
    info: TensorInfo,
    cand: LayerCandidate,
    dtype: torch.dtype,
    stream: _ShardStream,
    pattern: Pattern,
    writer: _SequentialFile,
    sidecar: SidecarWriter,
    keep_dense: bool,
    outcomes: dict[str, _Outcome],
) -> None:
    """Prune one weight as its bytes come from ``stream`` and write its effective bytes to ``writer``.

    Groups along the last axis (Linear weights) go in slices of ``_STREAM_GROUPS`` groups: the mask
    of :class:`nmcli.patterns.TopNSelector`, effective weights as bits times the mask (computed
    into the writer's staging buffer), the packed mask slice by slice (slices hold a multiple of 8
    weights), L1 sums in float64 across slices, ``--keep-dense`` bytes appended to the sidecar as
    they pass. The packed mask is then checked against the N:M rule (exactly ``n`` kept in every
    group). Other layouts (convs, GPT-2 Conv1D) and dtypes are read whole and take the in-memory path.
    """
    import torch

    from nmcli.patterns import _KEY_TYPES, TopNSelector, apply_mask, nm_mask

    name, shape, (n, m) = info.name, tuple(cand.shape), (pattern.n, pattern.m)
    axis = cand.axis % len(shape)
    dtype_name = str(dtype).removeprefix("torch.")
    if axis != len(shape) - 1 or dtype_name not in _KEY_TYPES or shape[-1] % m:
        weight = torch.frombuffer(stream.take(info.nbytes), dtype=dtype).reshape(shape)
        mask = nm_mask(weight, pattern, axis)
        effective = apply_mask(weight, mask)
        finish_layer(name, cand, pattern, weight, effective, mask, weight if keep_dense else None, sidecar, outcomes)
        writer.write(_raw_bytes(effective))
        return
    bits = getattr(torch, _KEY_TYPES[dtype_name][0])
    size_of = torch.empty((), dtype=dtype).element_size()
    count = info.nbytes // size_of // m  # groups
    step = min(_STREAM_GROUPS, max(count, 1))
    select = TopNSelector(pattern, dtype, "cpu", step)
    keep = torch.empty(step, m, dtype=torch.bool)
    effective_bits = torch.empty(step, m, dtype=bits)
    packed = np.empty((count * m + 7) // 8, dtype=np.uint8)
    total = kept = 0.0
    if keep_dense:
        sidecar.begin(DENSE_PREFIX + name, dtype, shape)
    for start in range(0, count, step):
        size = min(step, count - start)
        nbytes = size * m * size_of
        raw = stream.take(nbytes)
        part = torch.frombuffer(raw, dtype=dtype).view(size, m)
        part_keep, part_bits = keep[:size], effective_bits[:size]
        select(part, out=part_keep)
        staged = writer.reserve(nbytes, size_of)
        if staged is not None:  # the effective bits go straight into the output's staging buffer
            part_bits = torch.frombuffer(staged, dtype=bits).view(size, m)
        torch.mul(part.view(bits), part_keep, out=part_bits)
        if staged is not None:
            writer.commit(nbytes)
        else:
            writer.write(part_bits.numpy())
        if keep_dense:
            sidecar.extend(raw)
        first = start * m // 8
        piece = np.packbits(part_keep.numpy().reshape(-1), bitorder="little")
        packed[first : first + piece.size] = piece
        total += float(part.abs().sum(dtype=torch.float32))
        kept += float(part_bits.view(dtype).abs().sum(dtype=torch.float32))
        del part, raw, staged
    if keep_dense:
        sidecar.end()
    if not _exactly_n(packed, shape, axis, n, m):
        raise CheckpointError(f"tensor {name}: the streamed mask does not keep exactly {n} of every {m} (a bug)")
    kept_count = count * n
    sidecar.add(MASK_PREFIX + name, torch.from_numpy(packed))
    outcomes[name] = _Outcome(kept / total if total > 0 else 1.0, count * m - kept_count)


_Slot = tuple["nn.Module", str, bool, str]  # (module, attribute, is a parameter, full model name)


def _slots(model: nn.Module, blocks: Sequence[str]) -> tuple[dict[str, list[_Slot]], list[_Slot]]:
    """Every parameter and buffer attribute of ``model``: per block, and those outside the blocks."""
    inside: dict[str, list[_Slot]] = {b: [] for b in blocks}
    outside: list[_Slot] = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        owner = next((b for b in blocks if module_name == b or module_name.startswith(b + ".")), None)
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for attr, value in table.items():
                if value is None:
                    continue
                slot = (module, attr, is_param, f"{module_name}.{attr}" if module_name else attr)
                (inside[owner] if owner is not None else outside).append(slot)
    return inside, outside


class _StreamedBlocks:
    """The :class:`nmcli.oneshot.BlockIO` of a sharded prune: blocks materialized from the input shards,
    written into the output shards (masks into the sidecar) and sent back to the meta device."""

    def __init__(
        self,
        plan: _Plan,
        pattern: Pattern,
        reader: ShardReader,
        shards: OutputShards,
        sidecar: SidecarWriter,
        keep_dense: bool,
        outcomes: dict[str, _Outcome],
        device: str,
        bar: _Progress,
        blocks: dict[str, list[_Slot]],
    ) -> None:
        self.plan, self.pattern, self.reader, self.shards, self.sidecar = plan, pattern, reader, shards, sidecar
        self.keep_dense, self.outcomes, self.device, self.bar, self.blocks = keep_dense, outcomes, device, bar, blocks
        self.written: set[str] = set()

    def materialize(self, slots: Sequence[_Slot]) -> None:
        """Read the slots' tensors from the shards (in the files' dtype); tied parameters stay tied."""
        from torch import nn

        made: dict[int, Any] = {}
        for module, attr, is_param, full in slots:
            table: dict[str, Any] = module._parameters if is_param else module._buffers
            old = table[attr]
            assert old is not None
            if id(old) in made:
                table[attr] = made[id(old)]
                continue
            key = self.plan.keys.get(full)
            if key is None:
                if is_param:
                    raise CheckpointError(f"parameter {full} is in no shard (a bug: the plan checks this)")
                if old.device.type != "meta":  # a buffer the files do not hold, computed at construction
                    table[attr] = made[id(old)] = old.to(self.device)
                continue
            # a copy: the pruner writes into it, and the map must keep the originals (kept |w|, --keep-dense)
            value = self.reader.tensor(key).to(self.device, copy=True)
            new = nn.Parameter(value, requires_grad=old.requires_grad) if is_param else value
            table[attr] = made[id(old)] = new

    def write(self, slots: Sequence[_Slot], layer_outcomes: Mapping[str, Any]) -> int:
        """Write the slots' final tensors (pruned layers: effective weights, masks to the sidecar); returns bytes."""
        import torch

        nbytes = 0
        for module, attr, is_param, full in slots:
            key = self.plan.keys.get(full)
            if key is None or key in self.written:
                continue
            table = module._parameters if is_param else module._buffers
            value = table[attr]
            assert value is not None
            value = value.detach()
            cand = self.plan.eligible.get(key)
            if cand is not None:
                outcome = layer_outcomes[cand.param]
                original = self.reader.tensor(key)
                mask = outcome.mask.to("cpu")
                effective = value.to("cpu")
                dense = torch.where(mask, effective, original) if self.keep_dense else None
                finish_layer(
                    key, cand, self.pattern, original, effective, mask, dense, self.sidecar, self.outcomes,
                    recon_error=outcome.recon_error, note=outcome.note,
                )  # fmt: skip
                # the block is freed next: the outcome keeps no reference to its tensors
                outcome.mask = outcome.weight = torch.empty(0)
                del original, dense
            self.shards.put(key, value)
            self.written.add(key)
            nbytes += self.plan.source.tensors[key].nbytes
        return nbytes

    @staticmethod
    def free(slots: Sequence[_Slot]) -> None:
        """Send the slots' tensors back to the meta device (buffers the files do not hold stay)."""
        from torch import nn

        made: dict[int, Any] = {}
        for module, attr, is_param, _ in slots:
            table = module._parameters if is_param else module._buffers
            old = table[attr]
            assert old is not None
            if old.device.type == "meta":
                continue
            if id(old) not in made:
                meta = old.detach().to("meta")
                made[id(old)] = nn.Parameter(meta, requires_grad=old.requires_grad) if is_param else meta
            table[attr] = made[id(old)]

    def load(self, block: str) -> None:
        self.materialize(self.blocks[block])

    def done(self, block: str, outcomes: Mapping[str, Any]) -> None:
        slots = self.blocks[block]
        nbytes = self.write(slots, outcomes)
        self.free([s for s in slots if s[3] in self.plan.keys or s[2]])
        number = list(self.blocks).index(block) + 1
        self.bar.advance(nbytes, f"block {number}/{len(self.blocks)}")


def _calibrated(
    plan: _Plan,
    pattern: Pattern,
    method: str,
    cfg: CalibrationConfig,
    batches: Sequence[Batch],
    shards: OutputShards,
    sidecar: SidecarWriter,
    keep_dense: bool,
    outcomes: dict[str, _Outcome],
    notes: list[str],
    progress: ProgressCallback | None,
) -> dict[str, str]:
    """Wanda/SparseGPT block by block from the shards (:func:`nmcli.oneshot.prune_calibrated` with a BlockIO).

    Everything outside the blocks (embeddings, rotary buffers, final norm, heads) is materialized
    for the whole run; one block at a time besides. Returns the sha256 of every input shard.
    """
    from nmcli.batchnorm import has_batchnorm
    from nmcli.checkpoint import sha256_file
    from nmcli.oneshot import find_blocks, prune_calibrated

    model = plan.model
    layers = [c for c in plan.candidates if c.eligible]
    found = find_blocks(model, layers)
    if found is None or has_batchnorm(model):
        why = "it has BatchNorm layers" if found is not None else "it has no repeated blocks"
        raise InputError(
            f"{plan.source.folder} cannot be calibrated block by block from its shards ({why}): "
            "load it whole instead (give -o FILE.safetensors)"
        )
    inside, outside = _slots(model, found[1])
    bar = _Progress(progress, plan.source.total_bytes)
    with ShardReader(plan.source) as reader:
        io = _StreamedBlocks(plan, pattern, reader, shards, sidecar, keep_dense, outcomes, cfg.device, bar, inside)
        io.materialize(outside)
        try:
            result = prune_calibrated(model, layers, pattern, method, batches, cfg, None, block_io=io)
            bar.advance(io.write(outside, result.outcomes), "outside the blocks")
        finally:
            io.free(outside)
            for slots in inside.values():
                io.free(slots)
        for name in plan.source.tensors:  # tensors the architecture does not name: copied as they are
            if name not in io.written:
                shards.put(name, reader.tensor(name))
    notes.extend(result.notes)
    notes.append(
        f"streamed from {len(plan.source.files)} shard(s): one block of {found[0]} in memory at a time, "
        "the layers outside the blocks on passes that replay the last block's outputs"
    )
    return {f: sha256_file(plan.source.folder / f) for f in plan.source.files}


# --------------------------------------------------------------------------------------------
# Reading a sharded checkpoint


class ShardedCheckpointReader:
    """A sharded checkpoint directory read like :class:`nmcli.checkpoint.CheckpointReader`.

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
                from nmcli.compressed_shards import CompressedShards

                self._compressed = CompressedShards(self.model, self.meta.layers)
        except BaseException:
            self._sidecar.close()
            raise

    def __enter__(self) -> ShardedCheckpointReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()
        self._sidecar.close()

    @property
    def is_nmcli(self) -> bool:
        return True

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
        pruned weights), numpy only (:mod:`nmcli.maskcheck`); compressed weights are decoded first.
        Once ``cancelled()`` says yes (asked between reads), it stops with a partial result. It may
        run on another thread while this one reads packed masks (:meth:`packed_mask_array`).

        Raises:
            CheckpointError: a weight or mask has the wrong size, or a shard cannot be read.
        """
        from nmcli.maskcheck import pruned_nonzero, pruned_nonzero_in_file

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
        """Read and validate the whole checkpoint into memory (see :func:`load_sharded`)."""
        assert self.meta is not None
        _check_fits(self.path, self._compressed.decoded_bytes if self._compressed else self.model.total_bytes)
        try:
            tensors = dict(self.iter_state())
            packed = {name: self.packed_mask(name) for name in self.mask_names}
            dense_tensors = {name: self.dense(name) for name in self.dense_names}
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{self.path} could not be read ({exc}): it may be truncated; re-create it") from exc
        _raise_problems(self.path, validate_checkpoint(tensors, packed, dense_tensors, self.meta))
        masks = {e.param: unpack_mask(packed[e.param], e.shape) for e in self.meta.layers}
        return Checkpoint(tensors=tensors, masks=masks, meta=self.meta, dense=dense_tensors if dense else {})


_LUTS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _byte_tables(m: int) -> tuple[np.ndarray, np.ndarray]:
    """Per byte value: its popcount, and the largest popcount of its groups of ``m`` bits (``m`` divides 8)."""
    if m not in _LUTS:
        values = np.arange(256, dtype=np.uint16)
        bits = ((values[:, None] >> np.arange(8)) & 1).astype(np.uint8)
        _LUTS[m] = (bits.sum(1).astype(np.uint8), bits.reshape(256, 8 // m, m).sum(2).max(1).astype(np.uint8))
    return _LUTS[m]


_EXACT: dict[tuple[int, int], np.ndarray] = {}


def _exactly_n(packed: np.ndarray, shape: Sequence[int], axis: int, n: int, m: int) -> bool:
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


def load_sharded(path: str | os.PathLike[str], *, dense: bool = True) -> Checkpoint:
    """Read and validate a sharded checkpoint whole, when it fits in memory.

    Raises:
        CheckpointError: unreadable or invalid. InputError: it does not fit in memory.
    """
    with ShardedCheckpointReader(path) as reader:
        return reader.load(dense=dense)


def shard_count(path: str | os.PathLike[str]) -> int:
    files = weight_files(path)
    return len(files) if files else 0


__all__ = [
    "INDEX",
    "SIDECAR",
    "ShardedCheckpointReader",
    "ShardedModel",
    "atomic_directory",
    "build_skeleton",
    "is_hf_directory",
    "is_sharded_checkpoint",
    "load_sharded",
    "prune_directory",
]

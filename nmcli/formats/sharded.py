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
``nmcli.safetensors`` in the single-file format of :mod:`nmcli.formats.checkpoint` without the state dict:
packed masks, optional dense weights, and the ``nmcli`` metadata, whose source records the sha256
of every input shard. The whole directory is written as ``OUT.tmp-*`` and renamed into place only
when complete; an interrupted prune leaves nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nmcli.errors import CheckpointError, OutputExistsError, SourceError
from nmcli.formats.checkpoint import (
    FORMAT,
    CheckpointMeta,
)
from nmcli.formats.checksum import (
    CHECKSUM_HEADER_BYTES,
    packed_layout,
    wants_checksum,
    with_checksum,
)
from nmcli.formats.checksum import finish as finish_checksum
from nmcli.formats.safetensors import safetensors_header
from nmcli.member import link_outside, member_path, show_name

if TYPE_CHECKING:
    import torch

from nmcli.formats.rawio import SequentialFile
from nmcli.formats.reader import Closeable
from nmcli.formats.safetensors import ShardHeader, TensorInfo, read_header, safetensors_dtype
from nmcli.io import check_name_length, check_not_special, check_output_writable, temp_prefix, writing

SIDECAR = "nmcli.safetensors"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
LAYOUT = "sharded"  # the sidecar's "layout" metadata entry
# Files of other weight formats are never copied into the output: they would hold the dense weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx", ".gguf", ".pt2")
_WEIGHT_INDEXES = ("pytorch_model.bin.index.json", "tf_model.h5.index.json", "flax_model.msgpack.index.json")
_REOPEN_BYTES = 64 << 20  # a shard's memory map is reopened after this many bytes: RSS stays ~ one tensor
_COPY_CHUNK = 16 << 20
SIDECAR_STAGE_BYTES = 8 << 20  # a SidecarWriter's staging buffers (masks are small; dense copies stream)
_HEADER_RESERVE = 4096  # header bytes a SidecarWriter reserves by default (a larger header costs a copy)


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


class ShardReader(Closeable):
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


def raw_bytes(value: torch.Tensor) -> memoryview:
    import torch

    flat = value.detach().reshape(-1).contiguous()
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


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
        data = raw_bytes(value.to("cpu"))
        if data.nbytes != info.nbytes:
            raise CheckpointError(
                f"tensor {name}: {data.nbytes} bytes to write where the shard holds {info.nbytes} (a bug)"
            )
        fh = self._handles[info.file]
        fh.seek(self._starts[info.file] + info.begin)
        fh.write(data)
        self._pending.discard(name)

    @property
    def pending(self) -> list[str]:
        """The tensors not written yet, in name order."""
        return sorted(self._pending)

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

    The data section streams to disk through :class:`SequentialFile` behind a header region
    reserved up front; :meth:`finish` writes the header into it, padded with spaces (the format
    allows trailing whitespace in the header), so the data is written once. A header larger than
    the reservation goes in front of a copy of the data instead.

    The data is hashed on the writer's thread as it goes out (no second read, no extra memory);
    :meth:`finish` records the content checksum of :mod:`nmcli.formats.checksum` when the metadata is of an
    nmcli format (the reservation includes room for it).
    """

    def __init__(self, path: Path, reserve: int = _HEADER_RESERVE) -> None:
        self.path = path
        self._reserve = -(-(reserve + CHECKSUM_HEADER_BYTES) // 8) * 8
        self._file = SequentialFile(path, SIDECAR_STAGE_BYTES, hash_from=8 + self._reserve)
        self._file.write(bytes(8 + self._reserve))
        self._entries: list[tuple[str, str, tuple[int, ...], int]] = []
        self._open: tuple[str, str, tuple[int, ...], int] | None = None

    def add(self, name: str, value: torch.Tensor) -> None:

        code = safetensors_dtype(value.dtype)
        if code is None:
            raise CheckpointError(f"tensor {name} has dtype {value.dtype}, which safetensors cannot store")
        data = raw_bytes(value.to("cpu"))
        self._file.write(data)
        self._entries.append((name, code, tuple(value.shape), data.nbytes))

    def begin(self, name: str, dtype: torch.dtype, shape: Sequence[int]) -> None:
        """Start a tensor whose bytes come in pieces (:meth:`extend`), ended by :meth:`end`."""

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


def sidecar_metadata(meta: CheckpointMeta) -> dict[str, str]:
    return {"format": FORMAT, "layout": LAYOUT, "nmcli": json.dumps(meta.to_json(), separators=(",", ":"))}

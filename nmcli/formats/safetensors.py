"""safetensors primitives: headers, dtypes, raw bit layout and atomic writing, torch-free at import."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nmcli.errors import CheckpointError
from nmcli.formats.checksum import PLACEHOLDER, packed_layout, wants_checksum, with_checksum
from nmcli.formats.checksum import finish as finish_checksum
from nmcli.nm.bits import TensorBits

if TYPE_CHECKING:  # torch is imported where tensors are made: headers and packed masks read without it
    import torch
if TYPE_CHECKING:
    import torch


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    A sharded checkpoint directory (:mod:`nmcli.formats.sharded`) hashes as its safetensors files (sidecar
    and shards) in name order, one after the other.
    """
    digest = hashlib.sha256()
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else [Path(path)]
    for file in files:
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


_SAFETENSORS_DTYPES: dict[str, str] = {  # torch dtype name -> safetensors dtype code
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "complex64": "C64",
}


def safetensors_dtype(dtype: Any) -> str | None:
    """The safetensors dtype code (``BF16``) of a torch dtype, or None when safetensors cannot store it."""
    return _SAFETENSORS_DTYPES.get(str(dtype).removeprefix("torch."))


def safetensors_header(entries: Iterable[tuple[str, str, Sequence[int], int]], metadata: Mapping[str, str]) -> bytes:
    """The bytes a safetensors file starts with, for tensors ``(name, dtype code, shape, nbytes)`` stored in that order.

    8-byte little-endian header size, then the JSON header padded with spaces to 8 bytes; the data
    section that follows holds the tensors back to back in the same order.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, code, shape, size in entries:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str]
) -> None:
    """Write a safetensors file, streaming one tensor at a time.

    ``safetensors.torch.save_file`` first copies every tensor into a ``bytes`` object, which
    doubles peak memory on large models; this writes the same format (8-byte little-endian
    header size, JSON header padded with spaces to 8 bytes, raw little-endian data) straight
    from the tensors' memory. Tensors must be contiguous CPU tensors. A file of nmcli's own
    format (``metadata["format"]`` ``nmcli/...``) gets its content checksum (:mod:`nmcli.formats.checksum`),
    hashed as it is written: the header is rewritten in place at the end (same length).

    Raises:
        CheckpointError: a tensor has a dtype that safetensors cannot store.
    """
    import torch

    entries = []
    for name, value in tensors.items():
        code = safetensors_dtype(value.dtype)
        if code is None:
            raise CheckpointError(f"tensor {name} has dtype {value.dtype}, which safetensors cannot store")
        entries.append((name, code, tuple(value.shape), value.numel() * value.element_size()))
    checksummed = wants_checksum(metadata)
    digest = hashlib.sha256()
    length = 0
    with open(path, "wb") as fh:
        # nmcli's own files: a placeholder of the checksum's length, overwritten once the data is hashed
        fh.write(safetensors_header(entries, with_checksum(metadata, PLACEHOLDER) if checksummed else metadata))
        for value in tensors.values():
            if value.numel():
                data = value.detach().reshape(-1).contiguous().view(torch.uint8).numpy().data
                fh.write(data)
                if checksummed:
                    digest.update(data)
                    length += data.nbytes
        if checksummed:
            checksum = finish_checksum(digest, length, packed_layout(entries), metadata)
            fh.seek(0)
            fh.write(safetensors_header(entries, with_checksum(metadata, checksum)))


_ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_ITEM_SIZES |= {"F8_E4M3": 1, "F8_E5M2": 1, "C64": 8, "U16": 2, "U32": 4, "U64": 8}
_DTYPE_NAMES = {code: name for name, code in _SAFETENSORS_DTYPES.items()} | {
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
}
_UNSIGNED_BY_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (``BF16`` -> ``torch.bfloat16``).

    Raises:
        CheckpointError: a code torch has no dtype for.
    """
    import torch

    dtype = getattr(torch, _DTYPE_NAMES.get(code, ""), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(
            f"safetensors dtype {code} has no torch equivalent here: re-save the weights as F16/BF16/F32"
        )
    return dtype


class DataLayout:
    """Where each tensor's bytes sit in a safetensors file, and a read-only memory map of them."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        self._entries: dict[str, Any] = {k: v for k, v in header.items() if k != "__metadata__"}
        self._start = 8 + length
        self._path = path
        self._map: np.ndarray | None = None

    def bits(self, name: str) -> TensorBits:
        info = self._entries[name]
        code = str(info["dtype"])
        size = _ITEM_SIZES.get(code)
        if size is None:
            raise CheckpointError(f"{self._path}: tensor {name} has dtype {code}, which nmcli cannot read")
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        if end - begin != math.prod(shape) * size:
            raise CheckpointError(
                f"{self._path}: tensor {name} has {end - begin} bytes for shape {shape}: re-create it"
            )
        if begin == end:
            return TensorBits(_DTYPE_NAMES[code], np.zeros(shape, dtype=_UNSIGNED_BY_SIZE[size]))
        if self._map is None:
            self._map = np.memmap(self._path, dtype=np.uint8, mode="r")
        raw = self._map[self._start + begin : self._start + end]
        if raw.size != end - begin:
            raise CheckpointError(f"{self._path} is truncated inside tensor {name}: re-create it")
        return TensorBits(_DTYPE_NAMES[code], raw.view(_UNSIGNED_BY_SIZE[size]).reshape(shape))


def torch_from_bits(value: TensorBits) -> torch.Tensor:
    """A torch tensor of ``value``'s dtype over its bits (no copy unless they are read-only)."""
    import torch

    signed = value.bits.view(np.dtype(f"int{8 * value.bits.dtype.itemsize}"))
    if not signed.flags.writeable:  # a memory-mapped tensor: torch tensors are writable
        signed = signed.copy()
    return torch.from_numpy(signed).view(getattr(torch, value.dtype))


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
    """Parse the header of a safetensors file, and check that the file holds the data it declares.

    Raises:
        CheckpointError: the file is missing, truncated or not safetensors.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
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
    data_end = 8 + len(blob) + max((t.end for t in tensors), default=0)
    if file_size < data_end:
        raise CheckpointError(
            f"{path} ends before its header says it should ({file_size} of {data_end} bytes): it is truncated; re-save it"
        )
    return ShardHeader(head + blob, metadata, tensors)

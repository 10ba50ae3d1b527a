"""The content checksum of nmcli's own safetensors files: the one definition, its writers' helpers and its check.

Every file whose ``__metadata__["format"]`` starts with ``nmcli/`` (an ``nmcli/1`` checkpoint, the
``nmcli.safetensors`` sidecar of a sharded directory, an ``nmcli/1+compressed`` file or shard)
carries the ``__metadata__`` string ``"nmcli_sha256"``: 64 lowercase hex digits of

    sha256( DATA || CANON || uint64_le(len(DATA)) )

* ``DATA``: the data section, every byte after the header: from offset ``8 + N`` to the end of the
  file, ``N`` being the little-endian uint64 the file starts with (bytes appended to a file count);
* ``CANON``: the UTF-8 bytes of ``json.dumps({"metadata": M, "tensors": T}, sort_keys=True,
  separators=(",", ":"), ensure_ascii=True)``, where ``M`` is the ``__metadata__`` object without
  ``"nmcli_sha256"`` and ``T`` maps every tensor name to ``{"dtype": CODE, "shape": [...],
  "data_offsets": [BEGIN, END]}`` as the header holds them (key order and the header's padding
  do not count);
* the length suffix makes the split between ``DATA`` and ``CANON`` unambiguous.

The data comes first so that streamed writers hash it as they write it and add the header, which
they know only at the end. The checksum says whether a file is still what nmcli wrote: an edit of a
tensor byte, of the recorded source, pattern, layers or history shows as a mismatch. It is no
signature (anyone can recompute it): nothing is trusted because of it. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nmcli.errors import CheckpointError

CHECKSUM_KEY = "nmcli_sha256"
PLACEHOLDER = "0" * 64  # a checksum's length, for headers written before the data is hashed
# what the key adds to a header's JSON (a reservation made before the checksum is known)
CHECKSUM_HEADER_BYTES = len(json.dumps({CHECKSUM_KEY: PLACEHOLDER}, separators=(",", ":")))
OK = "ok"
MISMATCH = "mismatch"
ABSENT = "absent"
_READ_CHUNK = 8 << 20
_MAX_HEADER = 100 << 20


def wants_checksum(metadata: Mapping[str, str]) -> bool:
    """Whether a file with this ``__metadata__`` is nmcli's own format, which carries the checksum."""
    return str(metadata.get("format", "")).startswith("nmcli/")


def canonical_header(tensors: Mapping[str, Mapping[str, Any]], metadata: Mapping[str, str]) -> bytes:
    """``CANON`` of the definition: tensors as ``{name: {"dtype", "shape", "data_offsets"}}``, metadata as stored."""
    doc = {
        "metadata": {str(k): str(v) for k, v in metadata.items() if k != CHECKSUM_KEY},
        "tensors": {
            str(name): {
                "dtype": str(info["dtype"]),
                "shape": [int(d) for d in info["shape"]],
                "data_offsets": [int(x) for x in info["data_offsets"]],
            }
            for name, info in tensors.items()
        },
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("utf-8")


def packed_layout(entries: Iterable[tuple[str, str, Sequence[int], int]]) -> dict[str, dict[str, Any]]:
    """The header's tensor entries for tensors ``(name, dtype code, shape, nbytes)`` stored back to back."""
    out: dict[str, dict[str, Any]] = {}
    offset = 0
    for name, code, shape, size in entries:
        out[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    return out


def finish(
    data_digest: Any, data_length: int, tensors: Mapping[str, Mapping[str, Any]], metadata: Mapping[str, str]
) -> str:
    """The checksum, given a ``hashlib.sha256`` that has hashed ``DATA`` (``data_length`` bytes); the digest is copied."""
    digest = data_digest.copy()
    digest.update(canonical_header(tensors, metadata))
    digest.update(struct.pack("<Q", data_length))
    return str(digest.hexdigest())


def with_checksum(metadata: Mapping[str, str], checksum: str) -> dict[str, str]:
    """``metadata`` with its ``nmcli_sha256`` set (any previous value replaced)."""
    return {**{k: v for k, v in metadata.items() if k != CHECKSUM_KEY}, CHECKSUM_KEY: checksum}


@dataclass(frozen=True)
class Integrity:
    """The result of checking files against their recorded checksums.

    Attributes:
        status: ``ok`` (every checked file matches), ``mismatch`` (at least one does not: edited
            after nmcli wrote it) or ``absent`` (nothing recorded: written before checksums existed).
        mismatched: the files that do not match.
        absent: the files that record no checksum.
    """

    status: str
    mismatched: tuple[str, ...] = field(default=())
    absent: tuple[str, ...] = field(default=())

    @staticmethod
    def combine(results: Mapping[str, str]) -> Integrity:
        """One verdict over several files (file name -> status): any mismatch wins, then any absent."""
        mismatched = tuple(name for name, status in results.items() if status == MISMATCH)
        absent = tuple(name for name, status in results.items() if status == ABSENT)
        status = MISMATCH if mismatched else ABSENT if absent else OK
        return Integrity(status, mismatched, absent)


def verify_file(path: str | os.PathLike[str]) -> str:
    """``ok``, ``mismatch`` or ``absent``: the file's content against its recorded ``nmcli_sha256``.

    Streams the data section once in 8 MiB reads (memory stays at one read); numpy and torch are
    not needed.

    Raises:
        CheckpointError: the file is missing or not a readable safetensors file.
    """
    path = Path(path)
    try:
        with open(path, "rb", buffering=0) as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("shorter than 8 bytes")
            (size,) = struct.unpack("<Q", head)
            if size > _MAX_HEADER:
                raise ValueError(f"header of {size} bytes")
            blob = fh.read(size)
            if len(blob) != size:
                raise ValueError("truncated header")
            header = json.loads(blob)
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
            recorded = metadata.get(CHECKSUM_KEY)
            if recorded is None:
                return ABSENT
            digest = hashlib.sha256()
            length = 0
            buffer = bytearray(_READ_CHUNK)
            view = memoryview(buffer)
            try:
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except (AttributeError, OSError):
                pass
            while True:
                got = fh.readinto(buffer)
                if not got:
                    break
                digest.update(view[:got])
                length += got
            actual = finish(digest, length, header, metadata)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist: check the path") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}): it may be truncated; re-create it"
        ) from exc
    return OK if actual == recorded.lower() else MISMATCH


TAMPERED = "content does not match its recorded sha256: the file was edited after nmcli wrote it"

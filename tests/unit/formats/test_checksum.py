"""The content checksum of nmcli's files (nmcli.formats.checksum) and the weights-against-masks check (nmcli.nm.maskcheck)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nmcli.errors import CheckpointError
from nmcli.formats import checksum, sharded
from nmcli.formats.checkpoint import FORMAT
from nmcli.formats.checksum import ABSENT, CHECKSUM_KEY, MISMATCH, OK, verify_file
from nmcli.formats.safetensors import write_safetensors
from nmcli.nm import maskcheck


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(8, 16, generator=gen),
        "h": torch.randn(5, generator=gen).half(),
        "b": torch.tensor([1.5, -0.0, 2.0], dtype=torch.bfloat16),
        "e": torch.zeros(0, 3),
        "m": torch.tensor([0b1010, 255], dtype=torch.uint8),
    }


def _read(path: Path) -> tuple[dict[str, Any], bytes]:
    blob = path.read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + size]), blob[8 + size :]


def _rewrite(path: Path, header: dict[str, Any], data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _by_the_definition(path: Path) -> str:
    """The checksum as the module docstring defines it, computed independently of the module."""
    header, data = _read(path)
    metadata = {k: v for k, v in header.pop("__metadata__").items() if k != CHECKSUM_KEY}
    canon = json.dumps({"metadata": metadata, "tensors": header}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(data + canon.encode() + struct.pack("<Q", len(data))).hexdigest()


def test_nmcli_files_record_the_defined_checksum(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_safetensors(_tensors(), path, {"format": FORMAT, "nmcli": "{}"})
    header, _ = _read(path)
    recorded = header["__metadata__"][CHECKSUM_KEY]
    assert len(recorded) == 64 and recorded == _by_the_definition(path)
    assert verify_file(path) == OK
    # same content, same checksum: the file is byte-identical when written again
    again = tmp_path / "b.safetensors"
    write_safetensors(_tensors(), again, {"format": FORMAT, "nmcli": "{}"})
    assert again.read_bytes() == path.read_bytes()


def test_other_files_record_none(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    write_safetensors(_tensors(), path, {"format": "pt"})
    assert CHECKSUM_KEY not in _read(path)[0]["__metadata__"]
    assert verify_file(path) == ABSENT


def test_header_layout_does_not_count(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_safetensors(_tensors(), path, {"format": FORMAT, "nmcli": "{}"})
    header, data = _read(path)
    reordered = dict(reversed(list(header.items())))  # other key order, other padding
    _rewrite(path, reordered, data)
    assert verify_file(path) == OK


@pytest.mark.parametrize("edit", ["data-byte", "metadata", "dtype", "appended", "removed-key", "offsets"])
def test_edits_are_detected(tmp_path: Path, edit: str) -> None:
    path = tmp_path / "a.safetensors"
    write_safetensors(_tensors(), path, {"format": FORMAT, "nmcli": '{"source": {"trusted": false}}'})
    header, data = _read(path)
    if edit == "data-byte":
        data = data[:10] + bytes([data[10] ^ 1]) + data[11:]
    elif edit == "metadata":
        header["__metadata__"]["nmcli"] = '{"source": {"trusted": true}}'
    elif edit == "dtype":
        header["h"]["dtype"] = "BF16"
    elif edit == "appended":
        data += b"\0" * 8
    elif edit == "offsets":  # the header points two tensors at each other's bytes
        header["w"]["data_offsets"], header["b"]["data_offsets"] = (
            header["b"]["data_offsets"],
            header["w"]["data_offsets"],
        )
    else:
        del header["__metadata__"][CHECKSUM_KEY]
    _rewrite(path, header, data)
    assert verify_file(path) == (ABSENT if edit == "removed-key" else MISMATCH)


def test_unreadable_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        verify_file(tmp_path / "missing.safetensors")
    (tmp_path / "short.safetensors").write_bytes(b"\x10\0")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        verify_file(tmp_path / "short.safetensors")


@pytest.mark.parametrize("reserve", [0, 64, 1 << 16])
def test_sidecar_writer_hashes_as_it_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reserve: int) -> None:
    """Header in place or spilled, data through many small staging buffers: the checksum of write_safetensors."""
    monkeypatch.setattr(sharded, "SIDECAR_STAGE_BYTES", 4096)
    tensors = _tensors() | {"big": torch.arange(5000, dtype=torch.float32)}
    metadata = {"format": FORMAT, "layout": "sharded", "nmcli": "{}"}
    path = tmp_path / "side.safetensors"
    writer = sharded.SidecarWriter(path, reserve=reserve)
    try:
        for name, value in tensors.items():
            if name == "big":  # in pieces, as --keep-dense streams it
                writer.begin(name, value.dtype, value.shape)
                for piece in value.split(777):
                    writer.extend(piece.numpy().data)
                writer.end()
            else:
                writer.add(name, value)
        writer.finish(metadata)
    finally:
        writer.close()
    reference = tmp_path / "reference.safetensors"
    write_safetensors(tensors, reference, metadata)
    assert verify_file(path) == OK
    assert _read(path)[0]["__metadata__"] == _read(reference)[0]["__metadata__"]
    assert _by_the_definition(path) == _read(path)[0]["__metadata__"][CHECKSUM_KEY]


def test_reservation_leaves_room_for_the_checksum(tmp_path: Path) -> None:
    """A reservation sized for the header without the checksum still holds it: no spill, no copy."""
    from nmcli.formats.safetensors import safetensors_header

    value = torch.ones(3)
    metadata = {"format": FORMAT, "nmcli": "{}"}
    exact = len(safetensors_header([("t", "F32", (3,), 12)], metadata)) - 8
    writer = sharded.SidecarWriter(tmp_path / "s.safetensors", reserve=exact)
    try:
        writer.add("t", value)
        writer.finish(metadata)
    finally:
        writer.close()
    assert verify_file(tmp_path / "s.safetensors") == OK
    assert not list(tmp_path.glob(".*.data"))


def test_integrity_verdict_over_files() -> None:
    assert checksum.Integrity.combine({"a": OK, "b": OK}).status == OK
    verdict = checksum.Integrity.combine({"a": OK, "b": ABSENT, "c": MISMATCH})
    assert verdict.status == MISMATCH and verdict.mismatched == ("c",) and verdict.absent == ("b",)
    assert checksum.Integrity.combine({"a": ABSENT, "b": OK}).status == ABSENT


# --------------------------------------------------------------------------------------------
# Weights against packed masks


def _bits(value: torch.Tensor) -> np.ndarray:
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[value.element_size()]
    return value.contiguous().view(torch.uint8).numpy().view(unsigned)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8])
@pytest.mark.parametrize("numel", [1, 13, 64, 1000])
def test_pruned_nonzero_counts_every_breaking_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, numel: int
) -> None:
    monkeypatch.setattr(maskcheck, "CHUNK", 16)  # many chunks, and reads of a few chunks each
    monkeypatch.setattr(maskcheck, "READ", 48)
    gen = torch.Generator().manual_seed(numel)
    mask = torch.rand(numel, generator=gen) < 0.5
    values = (torch.randn(numel, generator=gen) * 10 + 20).to(dtype)
    weight = torch.where(mask, values, torch.zeros((), dtype=dtype))  # +0.0 where pruned (x * 0 can be -0.0)
    packed = np.packbits(mask.numpy(), bitorder="little")
    path = tmp_path / "w.bin"
    raw = weight.contiguous().view(torch.uint8).numpy().tobytes()
    path.write_bytes(b"x" * 24 + raw + b"y" * 5)
    assert maskcheck.pruned_nonzero(_bits(weight), packed) == 0
    size = weight.element_size()
    assert maskcheck.pruned_nonzero_in_file(path, 24, len(raw), size, packed) == 0
    broken = weight.clone()
    pruned = (~mask).nonzero().reshape(-1)
    if pruned.numel():
        if dtype.is_floating_point:
            broken[pruned[0]] = -0.0  # -0.0 is not +0.0
        else:
            broken[pruned[0]] = 1
        broken[pruned[-1:]] = 3
    expected = min(2, int(pruned.numel()))
    assert maskcheck.pruned_nonzero(_bits(broken), packed) == expected
    raw = broken.contiguous().view(torch.uint8).numpy().tobytes()
    path.write_bytes(b"x" * 24 + raw)
    assert maskcheck.pruned_nonzero_in_file(path, 24, len(raw), size, packed) == expected


def test_pruned_nonzero_refuses_a_mask_of_another_size(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot cover"):
        maskcheck.pruned_nonzero(np.zeros(17, dtype=np.uint16), np.zeros(2, dtype=np.uint8))
    path = tmp_path / "short.bin"
    path.write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="truncated"):
        maskcheck.pruned_nonzero_in_file(path, 0, 32, 4, np.zeros(1, dtype=np.uint8))

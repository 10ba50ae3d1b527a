"""The nmcli/1 file format, byte-level: layout, packing, metadata, validation, atomic writes."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nmcli.errors import CheckpointError, OutputExistsError
from nmcli.formats.checkpoint import (
    DENSE_PREFIX,
    FORMAT,
    MASK_PREFIX,
    Checkpoint,
    CheckpointMeta,
    CheckpointReader,
    LayerEntry,
    SourceRef,
    history_record,
    read_state_dict,
    save_checkpoint,
)
from nmcli.formats.open import load_checkpoint, read_meta
from nmcli.io import atomic_output
from nmcli.nm.bits import pack_mask, packed_size, unpack_mask
from nmcli.nm.masks import apply_mask, nm_mask
from nmcli.nm.pattern import Pattern

P24 = Pattern(2, 4)
# Two rows of two groups of 4; the 2:4 masks are [1,1,0,0 | 0,0,1,1] and [0,1,0,1 | 1,0,1,0].
WEIGHT = torch.tensor([[5.0, -4.0, 1.0, 0.0, 0.0, -1.0, 8.0, -9.0], [-1.0, 5.0, 2.0, 6.0, -9.0, 1.0, 7.0, 0.0]])
MASK = torch.tensor([[1, 1, 0, 0, 0, 0, 1, 1], [0, 1, 0, 1, 1, 0, 1, 0]], dtype=torch.bool)
# numpy.packbits(bitorder="little"): element 0 is the least significant bit of byte 0.
PACKED = bytes([0b11000011, 0b01011010])


def _checkpoint(*, dense: bool = True) -> Checkpoint:
    mask = nm_mask(WEIGHT, P24, 1)
    second = torch.arange(32, dtype=torch.float32).reshape(4, 8) - 16
    mask2 = nm_mask(second, P24, 1)
    tensors = {
        "fc.weight": apply_mask(WEIGHT, mask),
        "fc.bias": torch.tensor([0.5, -0.5]),
        "out.weight": apply_mask(second, mask2),
        "steps": torch.tensor(3, dtype=torch.int64),
    }
    meta = CheckpointMeta(
        source=SourceRef("py:/models.py:build", sha256="ab" * 32),
        pattern=P24,
        layers=[
            LayerEntry("fc.weight", "fc", 2, 4, 1, (2, 8)),
            LayerEntry("out.weight", "out", 2, 4, 1, (4, 8)),
        ],
        input_spec="1x8",
        history=[history_record("prune", {"pattern": "2:4"}, {"sparsity": 0.5})],
        method="magnitude",
    )
    dense_tensors = {"fc.weight": WEIGHT.clone()} if dense else {}
    return Checkpoint(tensors=tensors, masks={"fc.weight": mask, "out.weight": mask2}, meta=meta, dense=dense_tensors)


def _raw(path: Path) -> tuple[dict[str, Any], bytes]:
    """Parse a safetensors file by hand: (header JSON, data section)."""
    blob = path.read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + size]), blob[8 + size :]


def _bytes_of(header: dict[str, Any], data: bytes, name: str) -> bytes:
    start, end = header[name]["data_offsets"]
    return data[start:end]


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None, fmt: str = FORMAT) -> Path:
    """Write a safetensors file directly, bypassing save_checkpoint's validation."""
    metadata = {"format": fmt}
    if meta is not None:
        metadata["nmcli"] = json.dumps(meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _payload(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    out = dict(ckpt.tensors)
    out.update({MASK_PREFIX + k: pack_mask(v) for k, v in ckpt.masks.items()})
    out.update({DENSE_PREFIX + k: v for k, v in ckpt.dense.items()})
    return out


# --------------------------------------------------------------------------------------------
# Packing


def test_mask_of_known_weight() -> None:
    assert torch.equal(nm_mask(WEIGHT, P24, 1), MASK)


def test_packbits_little_endian_layout() -> None:
    packed = pack_mask(MASK)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert bytes(packed.numpy()) == PACKED
    assert bytes(np.packbits(MASK.reshape(-1).numpy(), bitorder="little")) == PACKED
    assert torch.equal(unpack_mask(packed, (2, 8)), MASK)


@pytest.mark.parametrize("shape", [(3,), (5, 3), (2, 3, 3, 3), (1,)])
def test_pack_round_trip_with_padding(shape: tuple[int, ...]) -> None:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.5
    packed = pack_mask(mask)
    assert packed.numel() == packed_size(shape) == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, shape), mask)


# --------------------------------------------------------------------------------------------
# Writing: the bytes on disk


def test_round_trip(tmp_path: Path) -> None:
    ckpt = _checkpoint()
    path = save_checkpoint(ckpt, tmp_path / "m.safetensors")
    back = load_checkpoint(path)
    assert back.tensors.keys() == ckpt.tensors.keys()
    for name, value in ckpt.tensors.items():
        assert torch.equal(back.tensors[name], value) and back.tensors[name].dtype == value.dtype
    for name, mask in ckpt.masks.items():
        assert torch.equal(back.masks[name], mask)
    assert torch.equal(back.dense["fc.weight"], WEIGHT)
    assert back.meta.layers == ckpt.meta.layers and back.pattern == P24
    assert back.meta.source == ckpt.meta.source and back.meta.input_spec == "1x8"
    assert back.meta.history == ckpt.meta.history and back.meta.method == "magnitude"
    assert load_checkpoint(path, dense=False).dense == {}


def test_file_layout_byte_level(tmp_path: Path) -> None:
    path = save_checkpoint(_checkpoint(), tmp_path / "m.safetensors")
    header, data = _raw(path)
    assert header["__metadata__"]["format"] == "nmcli/1"
    mask_entry = header[MASK_PREFIX + "fc.weight"]
    assert mask_entry["dtype"] == "U8" and mask_entry["shape"] == [2]
    assert _bytes_of(header, data, MASK_PREFIX + "fc.weight") == PACKED
    assert header["fc.weight"]["dtype"] == "F32" and header["fc.weight"]["shape"] == [2, 8]
    effective = np.frombuffer(_bytes_of(header, data, "fc.weight"), dtype="<f4").reshape(2, 8)
    np.testing.assert_array_equal(effective, np.where(MASK.numpy(), WEIGHT.numpy(), 0.0))
    dense = np.frombuffer(_bytes_of(header, data, DENSE_PREFIX + "fc.weight"), dtype="<f4").reshape(2, 8)
    np.testing.assert_array_equal(dense, WEIGHT.numpy())
    # Every tensor is stored under its own name: the plain architecture's state dict loads as is.
    assert set(read_state_dict(path)) == {"fc.weight", "fc.bias", "out.weight", "steps"}


def test_pruned_zeros_are_positive_zero_bytes(tmp_path: Path) -> None:
    negative = -torch.arange(1.0, 17.0).reshape(2, 8)
    mask = nm_mask(negative, P24, 1)
    ckpt = Checkpoint(
        tensors={"w": apply_mask(negative, mask)},
        masks={"w": mask},
        meta=CheckpointMeta(source=SourceRef("x"), pattern=P24, layers=[LayerEntry("w", "", 2, 4, 1, (2, 8))]),
    )
    header, data = _raw(save_checkpoint(ckpt, tmp_path / "z.safetensors"))
    words = np.frombuffer(_bytes_of(header, data, "w"), dtype="<u4").reshape(2, 8)
    assert (words[~mask.numpy()] == 0).all()  # +0.0 is all-zero bits; -0.0 would be 0x80000000
    assert (words[mask.numpy()] != 0).all()


def test_metadata_json_keys(tmp_path: Path) -> None:
    header, _ = _raw(save_checkpoint(_checkpoint(), tmp_path / "m.safetensors"))
    raw = header["__metadata__"]
    assert set(raw) == {"format", "nmcli", "nmcli_sha256"} and all(isinstance(v, str) for v in raw.values())
    meta = json.loads(raw["nmcli"])
    assert set(meta) == {"version", "source", "pattern", "method", "layers", "input", "history"}
    assert meta["pattern"] == "2:4" and meta["input"] == "1x8" and meta["method"] == "magnitude"
    assert set(meta["source"]) >= {"spec", "sha256", "arch"} and meta["source"]["sha256"] == "ab" * 32
    assert meta["layers"][0] == {"param": "fc.weight", "module": "fc", "n": 2, "m": 4, "axis": 1, "shape": [2, 8]}
    record = meta["history"][0]
    assert set(record) == {"command", "arguments", "nmcli", "torch", "time", "metrics"}
    assert record["command"] == "prune" and record["torch"] == torch.__version__
    assert record["time"].endswith("+00:00")  # UTC


def test_read_meta_reads_only_the_header(tmp_path: Path) -> None:
    path = save_checkpoint(_checkpoint(), tmp_path / "m.safetensors")
    meta = read_meta(path)
    assert meta is not None and [e.param for e in meta.layers] == ["fc.weight", "out.weight"]
    with CheckpointReader(path) as reader:
        assert reader.is_nmcli and reader.mask_names == ["fc.weight", "out.weight"]
        assert reader.dense_names == ["fc.weight"] and "fc.bias" in reader.state_names
        assert torch.equal(reader.mask("fc.weight"), MASK)


def test_plain_state_dict_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2, 4)}, str(path))
    assert read_meta(path) is None
    assert torch.equal(read_state_dict(path)["w"], torch.ones(2, 4))
    with pytest.raises(CheckpointError, match="plain state dict"):
        load_checkpoint(path)


def test_save_over_the_file_it_was_loaded_from(tmp_path: Path) -> None:
    # safetensors 0.8.0 can zero a file saved over the path it was memory-mapped from.
    path = save_checkpoint(_checkpoint(), tmp_path / "m.safetensors")
    ckpt = load_checkpoint(path)
    save_checkpoint(ckpt, path, force=True)
    again = load_checkpoint(path)
    assert torch.equal(again.tensors["fc.weight"], apply_mask(WEIGHT, MASK))
    assert torch.equal(again.dense["fc.weight"], WEIGHT)


# --------------------------------------------------------------------------------------------
# Validation: every problem, all at once


def test_unknown_format_version(tmp_path: Path) -> None:
    ckpt = _checkpoint()
    path = _write(tmp_path / "v2.safetensors", _payload(ckpt), ckpt.meta.to_json(), fmt="nmcli/2")
    with pytest.raises(CheckpointError, match=r"format 'nmcli/2'.*reads nmcli/1: upgrade nmcli"):
        load_checkpoint(path)


def test_unreadable_metadata_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata={"format": FORMAT, "nmcli": "{not json"})
    with pytest.raises(CheckpointError, match="unreadable nmcli metadata"):
        load_checkpoint(path)


def _defective(tmp_path: Path, name: str, change: Any) -> Path:
    ckpt = _checkpoint()
    payload = _payload(ckpt)
    change(payload)
    return _write(tmp_path / f"{name}.safetensors", payload, ckpt.meta.to_json())


@pytest.mark.parametrize(
    ("defect", "change", "message"),
    [
        ("missing-mask", lambda p: p.pop(MASK_PREFIX + "fc.weight"), r"mask __nmcli__/mask/fc.weight is missing"),
        (
            "misshaped-mask",
            lambda p: p.__setitem__(MASK_PREFIX + "fc.weight", torch.zeros(3, dtype=torch.uint8)),
            r"packed mask has uint8 shape \(3,\), expected uint8 of 2 bytes",
        ),
        (
            "mask-breaks-pattern",
            lambda p: p.__setitem__(MASK_PREFIX + "fc.weight", pack_mask(torch.ones(2, 8, dtype=torch.bool))),
            r"keeps more than 2 of 4 in 4 group\(s\), breaking 2:4",
        ),
        (
            "nonzero-where-pruned",
            lambda p: p.__setitem__("fc.weight", WEIGHT.clone()),
            # the dense WEIGHT has 5 non-zeros among its 8 pruned positions (two of them are 0.0)
            r"5 effective weight\(s\) are non-zero \(or -0.0\) where the mask prunes them",
        ),
        (
            "negative-zero",
            lambda p: p.__setitem__("fc.weight", torch.where(MASK, WEIGHT, torch.tensor(-0.0))),
            r"8 effective weight\(s\) are non-zero \(or -0.0\)",
        ),
        ("nan", lambda p: p["fc.bias"].__setitem__(0, float("nan")), r"tensor fc.bias holds NaN or infinite values"),
        (
            "inf-dense",
            lambda p: p[DENSE_PREFIX + "fc.weight"].__setitem__((0, 0), float("inf")),
            r"dense weights fc.weight holds NaN or infinite",
        ),
        (
            "wrong-shape",
            lambda p: p.__setitem__("fc.weight", torch.zeros(2, 4)),
            r"tensor has shape \(2, 4\), layer entry says \(2, 8\)",
        ),
        ("missing-weight", lambda p: p.pop("out.weight"), r"layer out.weight: no tensor out.weight in the file"),
        (
            "orphan-mask",
            lambda p: p.__setitem__(MASK_PREFIX + "fc.bias", torch.zeros(1, dtype=torch.uint8)),
            r"mask __nmcli__/mask/fc.bias has no layer entry",
        ),
    ],
)
def test_each_validation_error(tmp_path: Path, defect: str, change: Any, message: str) -> None:
    path = _defective(tmp_path, defect, change)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "1 problem(s)" in str(info.value)


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    def break_three(p: dict[str, torch.Tensor]) -> None:
        p.pop(MASK_PREFIX + "fc.weight")
        p["out.weight"] = torch.ones(4, 8)
        p["fc.bias"][1] = float("nan")

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_defective(tmp_path, "three", break_three))
    text = str(info.value)
    assert "(3 problem(s))" in text
    assert "fc.weight is missing" in text and "layer out.weight: 16 effective weight(s)" in text
    assert "fc.bias holds NaN" in text


def test_truncated_file(tmp_path: Path) -> None:
    good = save_checkpoint(_checkpoint(), tmp_path / "good.safetensors").read_bytes()
    for name, blob in (("short-data", good[:-9]), ("short-header", good[:40]), ("empty", b"")):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        with pytest.raises(CheckpointError, match=r"truncated|corrupt"):
            load_checkpoint(path)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(CheckpointError, match=r"not a readable safetensors file"):
        load_checkpoint(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_save_refuses_an_invalid_checkpoint_and_writes_nothing(tmp_path: Path) -> None:
    ckpt = _checkpoint()
    ckpt.tensors["fc.weight"] = WEIGHT.clone()  # non-zero where pruned
    with pytest.raises(CheckpointError, match="non-zero"):
        save_checkpoint(ckpt, tmp_path / "m.safetensors")
    reserved = _checkpoint()
    reserved.tensors["__nmcli__/x"] = torch.ones(1)
    with pytest.raises(CheckpointError, match="reserved prefix"):
        save_checkpoint(reserved, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Atomic, never-clobbering writes


def test_atomic_output_leaves_no_temp_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"partial")
        assert tmp.parent == tmp_path and tmp.exists()
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_failed_save_leaves_no_temp_file(tmp_path: Path) -> None:
    ckpt = _checkpoint()
    # safetensors cannot serialize quantized tensors: the write fails inside the atomic block.
    ckpt.tensors["q"] = torch.quantize_per_tensor(torch.zeros(4), 0.1, 0, torch.quint8)
    with pytest.raises(Exception):  # noqa: B017 - whatever safetensors raises
        save_checkpoint(ckpt, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_no_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="--force"):
        save_checkpoint(_checkpoint(), path)
    assert path.read_bytes() == b"keep me"
    save_checkpoint(_checkpoint(), path, force=True)
    assert load_checkpoint(path).pattern == P24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_never_overwrite_an_input(tmp_path: Path) -> None:
    path = save_checkpoint(_checkpoint(), tmp_path / "m.safetensors")
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="also an input"):
        save_checkpoint(_checkpoint(), path, force=True, inputs=[tmp_path / "." / "m.safetensors"])
    assert path.read_bytes() == before


def test_output_folder_must_exist(tmp_path: Path) -> None:
    with pytest.raises(OutputExistsError, match="does not exist"):
        save_checkpoint(_checkpoint(), tmp_path / "no" / "m.safetensors")


def test_written_file_is_world_readable(tmp_path: Path) -> None:
    path = save_checkpoint(_checkpoint(), tmp_path / "m.safetensors")
    assert path.stat().st_mode & 0o444 == 0o444


def test_streaming_writer_is_read_by_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from nmcli.formats.safetensors import write_safetensors

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=gen),
        "f16": torch.randn(7, generator=gen).half(),
        "bf16": torch.randn(2, 3, generator=gen).bfloat16(),
        "f64": torch.randn(1, generator=gen).double(),
        "i64": torch.arange(6).reshape(2, 3),
        "u8": torch.tensor([1, 255], dtype=torch.uint8),
        "bool": torch.tensor([[True, False, True]]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "w.safetensors"
    write_safetensors(tensors, path, {"k": "v"})
    header, _ = _raw(path)
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 8 == 0 and header["__metadata__"] == {"k": "v"}
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and torch.equal(back[name], value), name
    with pytest.raises(CheckpointError, match="cannot store"):
        write_safetensors({"c": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "c.safetensors", {})

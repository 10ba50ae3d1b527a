"""The compressed N:M codec: hand-computed layout, exact round trips, transparent reading, layering."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nmcli.nm.codec
from fixtures.models import tiny_mlp
from nmcli.commands.inspect import inspect_checkpoint, inspect_checkpoint_file
from nmcli.errors import CheckpointError
from nmcli.formats.checkpoint import (
    COMPRESSED_FORMAT,
    Checkpoint,
    CheckpointMeta,
    CheckpointReader,
    LayerEntry,
    SourceRef,
    save_checkpoint,
)
from nmcli.formats.open import compress_checkpoint, load_checkpoint
from nmcli.formats.safetensors import read_header
from nmcli.nm.codec import (
    INDICES_PREFIX,
    VALUES_PREFIX,
    compress_weight,
    decompress_weight,
    pack_indices,
    unpack_indices,
)
from nmcli.nm.masks import apply_mask, nm_mask
from nmcli.nm.pattern import Pattern
from nmcli.pipelines.inmemory import prune_model


def test_two_of_four_layout_matches_the_documented_bits() -> None:
    weight = np.array([[0.0, 3.0, 0.0, 5.0, 7.0, 0.0, 0.0, 2.0]], dtype=np.float32)
    mask = weight != 0
    entry = LayerEntry("w", "", 2, 4, 1, (1, 8))
    values, packed, exact = compress_weight(weight, mask, entry)
    assert values.tolist() == [[3.0, 5.0, 7.0, 2.0]]
    # indices 1, 3 | 0, 3 at 2 bits each, least significant first: 1 + 3<<2 + 0<<4 + 3<<6
    assert packed.tolist() == [1 + (3 << 2) + (0 << 4) + (3 << 6)] and exact
    back, back_mask = decompress_weight(values, packed, entry)
    assert np.array_equal(back, weight) and np.array_equal(back_mask, mask)


def test_bad_values_or_indices_are_checkpoint_errors() -> None:
    entry = LayerEntry("w", "", 2, 4, 1, (1, 8))
    values = np.zeros((1, 4), dtype=np.float32)
    with pytest.raises(CheckpointError, match=r"compressed values of w have shape \(1, 3\), expected \(1, 4\)"):
        decompress_weight(values[:, :3], np.zeros(1, np.uint8), entry)
    with pytest.raises(CheckpointError, match="compressed indices of w have 2 bytes, expected 1"):
        decompress_weight(values, np.zeros(2, np.uint8), entry)
    entry36 = LayerEntry("w", "", 1, 6, 1, (1, 6))  # 3-bit index 7 is outside a group of 6
    with pytest.raises(CheckpointError, match="point outside their groups of 6"):
        decompress_weight(np.ones((1, 1), np.float32), np.array([7], np.uint8), entry36)


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
def test_index_packing_round_trips(bits: int) -> None:
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 1 << bits, size=37).astype(np.uint8)
    packed = pack_indices(values, bits)
    assert packed.size == (37 * bits + 7) // 8
    assert unpack_indices(packed, 37, bits).tolist() == values.tolist()


@pytest.mark.parametrize(("n", "m", "axis", "shape"), [(2, 4, 1, (6, 16)), (4, 8, 1, (4, 8, 3, 3)), (2, 4, 0, (8, 5))])
def test_weight_round_trip_any_pattern_and_axis(n: int, m: int, axis: int, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    dense = torch.randn(shape)
    mask = nm_mask(dense, Pattern(n, m), axis)
    weight = apply_mask(dense, mask)
    entry = LayerEntry("w", "", n, m, axis, shape)
    values, packed, exact = compress_weight(weight.numpy(), mask.numpy(), entry)
    assert exact and values.size == weight.numel() * n // m
    back, back_mask = decompress_weight(values, packed, entry)
    assert np.array_equal(back, weight.numpy()) and np.array_equal(back_mask, mask.numpy())


def _checkpoint(dtype: torch.dtype, keep_dense: bool = False) -> Checkpoint:
    model = tiny_mlp().to(dtype)
    return prune_model(
        model, Pattern(2, 4), source=SourceRef("py:fixtures/models.py:tiny_mlp"), keep_dense=keep_dense
    ).checkpoint


def test_fp16_checkpoint_round_trips_exactly_at_about_half_the_size(tmp_path: Path) -> None:
    original = tmp_path / "mlp.safetensors"
    save_checkpoint(_checkpoint(torch.float16), original)
    packed = compress_checkpoint(original, tmp_path / "mlp-compressed.safetensors")
    a, b = load_checkpoint(original), load_checkpoint(packed)
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        assert a.tensors[name].dtype == b.tensors[name].dtype and torch.equal(a.tensors[name], b.tensors[name])
        assert not torch.signbit(b.tensors[name][b.tensors[name] == 0]).any()
    assert a.masks.keys() == b.masks.keys() and all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert [e.to_json() for e in a.meta.layers] == [e.to_json() for e in b.meta.layers]
    assert b.meta.history[-1]["command"] == "export"
    ratio = packed.stat().st_size / original.stat().st_size
    assert 0.5 < ratio < 0.62, ratio
    with CheckpointReader(packed) as reader:  # the stored file holds values and indices, not the weights
        assert reader.raw_metadata["compressed"] == COMPRESSED_FORMAT
    stored = {t.name for t in read_header(packed).tensors}
    assert any(k.startswith(VALUES_PREFIX) for k in stored) and any(k.startswith(INDICES_PREFIX) for k in stored)
    assert "0.weight" not in stored


def test_groups_keeping_fewer_than_n_store_their_mask(tmp_path: Path) -> None:
    weight = torch.tensor([[0.0, 3.0, 0.0, 0.0], [1.0, 0.0, 0.0, 2.0]])
    mask = torch.tensor([[False, True, False, False], [True, False, False, True]])
    meta = CheckpointMeta(SourceRef("x"), Pattern(2, 4), [LayerEntry("w", "", 2, 4, 1, (2, 4))])
    original = tmp_path / "a.safetensors"
    save_checkpoint(Checkpoint({"w": weight}, {"w": mask}, meta), original)
    back = load_checkpoint(compress_checkpoint(original, tmp_path / "b.safetensors"))
    assert torch.equal(back.tensors["w"], weight) and torch.equal(back.masks["w"], mask)


def test_dense_weights_are_kept_and_plain_state_dicts_refused(tmp_path: Path) -> None:
    original = tmp_path / "dense.safetensors"
    save_checkpoint(_checkpoint(torch.float32, keep_dense=True), original)
    back = load_checkpoint(compress_checkpoint(original, tmp_path / "c.safetensors"))
    assert back.dense.keys() == load_checkpoint(original).dense.keys() and back.dense
    empty = Checkpoint({"b": torch.zeros(3)}, {}, CheckpointMeta(SourceRef("x")))
    save_checkpoint(empty, tmp_path / "empty.safetensors")
    with pytest.raises(CheckpointError, match="nothing to compress"):
        compress_checkpoint(tmp_path / "empty.safetensors", tmp_path / "d.safetensors")


def test_bf16_compressed_file_reads_back_exactly_and_inspects_without_torch(tmp_path: Path) -> None:
    original = tmp_path / "bf16.safetensors"
    save_checkpoint(_checkpoint(torch.bfloat16, keep_dense=True), original)
    packed = compress_checkpoint(original, tmp_path / "bf16-compressed.safetensors")
    a, b = load_checkpoint(original), load_checkpoint(packed)
    for name in a.tensors:
        assert b.tensors[name].dtype == torch.bfloat16 and torch.equal(a.tensors[name], b.tensors[name])
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks) and b.dense.keys() == a.dense.keys()
    expected = inspect_checkpoint(a, Pattern(2, 4), target=str(packed)).to_json()
    expected["integrity"] = "ok"  # the file-only path also checks the compressed file's recorded sha256
    assert inspect_checkpoint_file(packed).to_json() == expected
    script = (
        "import json, sys\n"
        "from nmcli.commands.inspect import inspect_checkpoint_file\n"
        "report = inspect_checkpoint_file(sys.argv[1]).to_json()\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'report': report}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(packed)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"torch": False, "report": expected}


def test_the_codec_is_a_layer_below_the_reader() -> None:
    """nm/codec.py never imports nmcli.formats (nor torch): the reader calls the codec, not the reverse."""
    tree = ast.parse(Path(nmcli.nm.codec.__file__).read_text())
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(m.startswith("nmcli.formats") for m in imported) and not any(
        m.split(".")[0] == "torch" for m in imported
    )
    assert imported & {"nmcli.errors", "numpy"} == {"nmcli.errors", "numpy"}


@pytest.mark.parametrize(
    "order", [("nmcli.nm.codec", "nmcli.formats.checkpoint"), ("nmcli.formats.checkpoint", "nmcli.nm.codec")]
)
def test_either_module_imports_first(order: tuple[str, str]) -> None:
    script = (
        "import importlib, sys\n"
        f"first = importlib.import_module({order[0]!r})\n"
        f"second = importlib.import_module({order[1]!r})\n"
        "import nmcli.formats.checkpoint as c, nmcli.nm.codec as z\n"
        "assert c.decompress_weight is z.decompress_weight and c.VALUES_PREFIX == z.VALUES_PREFIX\n"
        "print('nmcli.formats.checkpoint' in sys.modules, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False"]


@pytest.mark.parametrize(("n", "m", "shape", "axis"), [(2, 4, (37, 16), 1), (3, 8, (21, 24), 1), (2, 4, (16, 9), 0)])
def test_encoding_in_row_chunks_gives_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch, n: int, m: int, shape: tuple[int, int], axis: int
) -> None:
    """Rows are encoded a chunk (a multiple of 8 rows) at a time: the stream is the one-step stream."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(shape).astype(np.float32)
    moved = np.moveaxis(weight, axis, -1)
    groups = np.abs(moved).reshape(*moved.shape[:-1], -1, m)
    keep = groups >= np.sort(groups, axis=-1)[..., m - n : m - n + 1]
    keep[0, 0] = False  # one group keeps none: not exact
    mask = np.moveaxis(keep.reshape(moved.shape), -1, axis)
    entry = LayerEntry("w", "", n, m, axis, shape)
    whole = compress_weight(np.where(mask, weight, 0).view(np.uint32), mask, entry)
    monkeypatch.setattr(nmcli.nm.codec, "CHUNK_ELEMENTS", 1)  # 8 rows per step
    chunked = compress_weight(np.where(mask, weight, 0).view(np.uint32), mask, entry)
    assert np.array_equal(whole[0], chunked[0]) and np.array_equal(whole[1], chunked[1]) and not chunked[2]
    back, back_mask = decompress_weight(chunked[0], chunked[1], entry)
    assert np.array_equal(back_mask | ~mask, np.ones(shape, bool))  # the indices name every kept weight
    assert np.array_equal(back.view(np.float32), np.where(mask, weight, 0))
    assert np.array_equal(nmcli.nm.codec.decompress_mask(chunked[1], entry), back_mask)


@pytest.mark.parametrize(
    ("n", "m", "shape", "axis"),
    [(2, 4, (6, 16), 1), (1, 4, (3, 32), 1), (1, 2, (5, 8), 1), (2, 16, (2, 64), 1), (1, 16, (4, 32), 1),
     (4, 8, (3, 16), 1), (2, 4, (16, 6), 0), (2, 4, (3, 4), 1), (2, 4, (2, 3, 8), 2)],
)  # fmt: skip
def test_packed_mask_from_the_indices_alone(n: int, m: int, shape: tuple[int, ...], axis: int) -> None:
    """The table lookup (whole bytes of indices along the last axis) gives the packed mask of the slow path."""
    rng = np.random.default_rng(1)
    scores = np.moveaxis(rng.random(shape), axis, -1)
    groups = scores.reshape(*scores.shape[:-1], -1, m)
    keep = groups >= np.sort(groups, axis=-1)[..., m - n : m - n + 1]
    mask = np.moveaxis(keep.reshape(scores.shape), -1, axis)
    entry = LayerEntry("w", "", n, m, axis, shape)
    _, packed, exact = compress_weight(rng.random(shape).astype(np.float32), mask, entry)
    assert exact
    expected = np.packbits(mask.reshape(-1), bitorder="little")
    assert np.array_equal(nmcli.nm.codec.decompress_packed_mask(packed, entry), expected)
    assert np.array_equal(nmcli.nm.codec.decompress_mask(packed, entry), mask)
    with pytest.raises(CheckpointError, match="compressed indices of w have"):
        nmcli.nm.codec.decompress_packed_mask(packed[:-1], entry)


def test_packed_mask_table_by_hand() -> None:
    # indices 1, 3 | 0, 3 (the documented byte) keep positions 1, 3, 4, 7: mask byte 0b10011010
    entry = LayerEntry("w", "", 2, 4, 1, (1, 8))
    byte = np.array([1 + (3 << 2) + (0 << 4) + (3 << 6)], dtype=np.uint8)
    assert nmcli.nm.codec.decompress_packed_mask(byte, entry).tolist() == [0b10011010]

"""The compressed N:M codec: hand-computed layout, exact round trips, transparent reading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nmcli.checkpoint import (
    Checkpoint,
    CheckpointMeta,
    CheckpointReader,
    LayerEntry,
    SourceRef,
    load_checkpoint,
    save_checkpoint,
)
from nmcli.compressed import (
    COMPRESSED_FORMAT,
    INDICES_PREFIX,
    VALUES_PREFIX,
    compress_checkpoint,
    compress_weight,
    decompress_weight,
    pack_indices,
    unpack_indices,
)
from nmcli.errors import CheckpointError
from nmcli.patterns import Pattern, apply_mask, nm_mask
from nmcli.prune import prune_model
from tests.models import tiny_mlp


def test_two_of_four_layout_matches_the_documented_bits() -> None:
    weight = torch.tensor([[0.0, 3.0, 0.0, 5.0, 7.0, 0.0, 0.0, 2.0]])
    mask = weight.ne(0)
    entry = LayerEntry("w", "", 2, 4, 1, (1, 8))
    values, packed, exact = compress_weight(weight, mask, entry)
    assert values.tolist() == [[3.0, 5.0, 7.0, 2.0]]
    # indices 1, 3 | 0, 3 at 2 bits each, least significant first: 1 + 3<<2 + 0<<4 + 3<<6
    assert packed.tolist() == [1 + (3 << 2) + (0 << 4) + (3 << 6)] and exact
    back, back_mask = decompress_weight(values, packed, entry)
    assert torch.equal(back, weight) and torch.equal(back_mask, mask)


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
    values, packed, exact = compress_weight(weight, mask, entry)
    assert exact and values.numel() == weight.numel() * n // m
    back, back_mask = decompress_weight(values, packed, entry)
    assert torch.equal(back, weight) and torch.equal(back_mask, mask)


def _checkpoint(dtype: torch.dtype, keep_dense: bool = False) -> Checkpoint:
    model = tiny_mlp().to(dtype)
    return prune_model(
        model, Pattern(2, 4), source=SourceRef("py:tests/models.py:tiny_mlp"), keep_dense=keep_dense
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
        stored = set(reader._handle.__enter__().keys())
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

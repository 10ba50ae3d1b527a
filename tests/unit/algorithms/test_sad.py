"""SAD core: bit-level counting, stored and derived masks, several inputs, every mismatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nmcli.commands.sad import sad_report
from nmcli.errors import CheckpointError, InputError, MismatchError, SourceError
from nmcli.formats.checkpoint import Checkpoint, CheckpointMeta, LayerEntry, SourceRef, save_checkpoint
from nmcli.formats.open import load_checkpoint
from nmcli.nm.bits import pack_mask, packed_popcount, packed_xor_count
from nmcli.nm.masks import apply_mask, nm_mask
from nmcli.nm.pattern import Pattern
from nmcli.pipelines.sad import compare_masks, derive_packed_mask, layer_sad, report_pairs
from tests.conftest import py_source

P24 = Pattern(2, 4)


def _write_ckpt(
    path: Path,
    weights: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    extra: dict[str, torch.Tensor] | None = None,
    pattern: Pattern = P24,
) -> Path:
    """An nmcli/1 checkpoint of Linear-like weights with the given boolean masks (axis 1)."""
    entries = [LayerEntry(p, p.rsplit(".", 1)[0], pattern.n, pattern.m, 1, tuple(w.shape)) for p, w in weights.items()]
    tensors = {p: apply_mask(w, masks[p]) if p in masks else w for p, w in weights.items()}
    tensors.update(extra or {})
    meta = CheckpointMeta(
        source=SourceRef("py:nowhere:f"), pattern=pattern, layers=[e for e in entries if e.param in masks]
    )
    save_checkpoint(Checkpoint(tensors=tensors, masks=masks, meta=meta), path)
    return path


def _random_24(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen)
    return weight, nm_mask(weight, P24, 1)


# --------------------------------------------------------------------------------------------
# Hand-made masks


def test_identical_masks_have_zero_sad() -> None:
    mask = torch.tensor([[True, True, False, False, False, True, False, True]])
    result = compare_masks({"w": mask}, {"w": mask.clone()})
    assert (result.sad, result.total, result.normalized) == (0, 8, 0.0)
    assert [x.param for x in result.layers] == ["w"]


def test_moved_kept_pair_in_one_group_counts_four() -> None:
    a = torch.tensor([[True, True, False, False, True, False, True, False]])
    b = torch.tensor([[False, False, True, True, True, False, True, False]])  # group 0's pair moved
    result = compare_masks({"w": a}, {"w": b})
    assert result.sad == 4
    assert result.total == 8
    assert result.normalized == pytest.approx(0.5)
    assert layer_sad("w", a, b).sad == 4


def test_packed_xor_count_is_bit_level() -> None:
    a = np.array([0b00000011, 0xFF, 0x00], dtype=np.uint8)
    b = np.array([0b00001100, 0xFF, 0x01], dtype=np.uint8)
    assert packed_xor_count(a, b) == 5
    assert packed_popcount(a) == 10
    with pytest.raises(MismatchError):
        packed_xor_count(a, b[:2])


def test_packed_count_matches_unpacked_xor_on_odd_sizes() -> None:
    gen = torch.Generator().manual_seed(3)
    for numel in (1, 7, 8, 9, 63, 64, 65, 1001):
        a = torch.rand(numel, generator=gen) > 0.5
        b = torch.rand(numel, generator=gen) > 0.5
        assert packed_xor_count(pack_mask(a), pack_mask(b)) == int((a ^ b).sum())


def test_compare_masks_reports_one_sided_layers() -> None:
    _, m = _random_24((4, 8), 0)
    result = compare_masks({"x": m, "only_a": m}, {"x": m, "only_b": m})
    assert [(x.param, x.pruned_in) for x in result.one_sided] == [("only_a", "a"), ("only_b", "b")]
    assert all(x.pruned == 16 and x.total == 32 for x in result.one_sided)
    assert result.total == 32  # one-sided layers are reported, not summed


def test_compare_masks_rejects_shape_mismatch() -> None:
    with pytest.raises(MismatchError, match="w"):
        compare_masks({"w": torch.ones(4, 8, dtype=torch.bool)}, {"w": torch.ones(8, 4, dtype=torch.bool)})


def test_derive_packed_mask_in_slices_equals_nm_mask() -> None:
    gen = torch.Generator().manual_seed(1)
    for shape, axis in (((24, 16), 1), ((16, 24), 0), ((8, 8, 3, 3), 1)):
        weight = torch.randn(shape, generator=gen).half()
        expected = pack_mask(nm_mask(weight, P24, axis))
        assert torch.equal(derive_packed_mask(weight, P24, axis, chunk_elements=64), expected)


# --------------------------------------------------------------------------------------------
# Checkpoints on disk


def test_checkpoint_sad_matches_in_memory_compare(tmp_path: Path) -> None:
    wa, ma = _random_24((16, 32), 0)
    wb, mb = _random_24((16, 32), 1)
    a = _write_ckpt(tmp_path / "a.safetensors", {"l.weight": wa}, {"l.weight": ma})
    b = _write_ckpt(tmp_path / "b.safetensors", {"l.weight": wb}, {"l.weight": mb})
    report = sad_report([str(a), str(b)])
    result = report.pairs[0]
    assert result.sad == int((ma ^ mb).sum())
    assert result.total == 16 * 32
    # the finetune figure's entry point agrees on the same pair
    in_memory = compare_masks(load_checkpoint(a).masks, load_checkpoint(b).masks)
    assert (in_memory.sad, in_memory.total) == (result.sad, result.total)
    assert report.to_json()["a"] == str(a) and report.to_json()["b"] == str(b)


def test_stored_and_derived_masks_agree(tmp_path: Path) -> None:
    from nmcli.commands.prune import run_prune

    torch.manual_seed(0)
    src = py_source("tiny_mlp")
    ckpt = tmp_path / "mlp.safetensors"
    run_prune(src, pattern="2:4", output=str(ckpt))
    # the dense model through the N:M rule gives exactly the stored masks
    assert sad_report([str(ckpt), src], pattern=P24).pairs[0].sad == 0
    # a perturbed dense snapshot, as a plain state dict with --arch and as a .pt state dict
    from fixtures.models import tiny_mlp

    model = tiny_mlp()
    with torch.no_grad():
        model[2].weight.add_(0.05 * torch.randn_like(model[2].weight))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "snap.safetensors"))
    torch.save(state, tmp_path / "snap.pt")
    stored = load_checkpoint(ckpt).masks
    expected = sum(int((stored[p] ^ nm_mask(state[p], P24, 1)).sum()) for p in stored)
    assert expected > 0
    for snap in ("snap.safetensors", "snap.pt"):
        result = sad_report([str(ckpt), str(tmp_path / snap)], pattern=P24, arch=src).pairs[0]
        assert result.sad == expected
        assert [x.param for x in result.layers] == list(stored)  # only prunable layers (no biases)


def test_plain_state_dict_without_arch_infers_layers_and_pattern(tmp_path: Path) -> None:
    from fixtures.models import tiny_mlp

    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_mlp().state_dict().items()}, str(path))
    report = sad_report([str(path), str(path)])
    # dense weights: no pattern in their zeros, so 2:4 by default, said in a note
    assert report.pattern is not None and (str(report.pattern.pattern), report.pattern.origin) == ("2:4", "default")
    assert "pass -p N:M" in report.notes[0]
    assert [x.param for x in report.pairs[0].layers] == ["0.weight", "2.weight", "4.weight"]
    assert report.pairs[0].sad == 0 and report.pairs[0].total == 64 * 128 + 128 * 64 + 64 * 10
    described = report.to_json()["masks"][0]
    assert described["layers_from"] == "inferred"
    taken = {t["param"]: (t["taken"], t["reason"]) for t in described["tensors"]}
    assert taken == {
        **{f"{i}.weight": (True, "") for i in (0, 2, 4)},
        **{f"{i}.bias": (False, "not named *.weight (a bias, buffer or statistic)") for i in (0, 2, 4)},
    }
    with pytest.raises(SourceError, match="does not fit"):
        sad_report([str(path), str(path)], pattern=P24, arch=py_source("tiny_cnn"))


def test_several_checkpoints_consecutive_and_vs_first(tmp_path: Path) -> None:
    masks = [_random_24((8, 16), seed)[1] for seed in range(4)]
    paths = [
        str(_write_ckpt(tmp_path / f"c{i}.safetensors", {"l.weight": torch.ones(8, 16)}, {"l.weight": m}))
        for i, m in enumerate(masks)
    ]
    report = sad_report(paths)
    assert [(r.a, r.b) for r in report.pairs] == [(paths[i], paths[i + 1]) for i in range(3)]
    assert [(r.a, r.b) for r in report.vs_first] == [(paths[0], paths[j]) for j in range(1, 4)]
    assert [r.sad for r in report.pairs] == [int((masks[i] ^ masks[i + 1]).sum()) for i in range(3)]
    assert [r.sad for r in report.vs_first] == [int((masks[0] ^ masks[j]).sum()) for j in range(1, 4)]
    assert len(report.results) == 5  # (0,1) is both consecutive and vs-first: counted once
    data = report.to_json()
    assert set(data) == {"inputs", "pairs", "vs_first", "pattern", "pattern_from", "masks"}
    assert data["pattern"] is None and [m["masks"] for m in data["masks"]] == ["stored"] * 4
    assert data["inputs"] == paths
    assert report_pairs(3) == ([(0, 1), (1, 2)], [(0, 1), (0, 2)])


def test_fewer_than_two_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="two"):
        sad_report([str(tmp_path / "x.safetensors")])


# --------------------------------------------------------------------------------------------
# Mismatches


def test_mismatched_parameter_names(tmp_path: Path) -> None:
    w, m = _random_24((8, 16), 0)
    a = _write_ckpt(tmp_path / "a.safetensors", {"l.weight": w}, {"l.weight": m}, extra={"l.bias": torch.zeros(8)})
    b = _write_ckpt(tmp_path / "b.safetensors", {"l.weight": w}, {"l.weight": m}, extra={"k.bias": torch.zeros(8)})
    with pytest.raises(MismatchError, match=r"only in .*a\.safetensors: l\.bias.*only in .*b\.safetensors: k\.bias"):
        sad_report([str(a), str(b)])


def test_mismatched_shapes(tmp_path: Path) -> None:
    wa, ma = _random_24((8, 16), 0)
    wb, mb = _random_24((16, 8), 0)
    a = _write_ckpt(tmp_path / "a.safetensors", {"l.weight": wa}, {"l.weight": ma})
    b = _write_ckpt(tmp_path / "b.safetensors", {"l.weight": wb}, {"l.weight": mb})
    with pytest.raises(MismatchError, match=r"shape.*l\.weight \(8, 16\) vs \(16, 8\)"):
        sad_report([str(a), str(b)])


def test_mismatched_patterns(tmp_path: Path) -> None:
    w = torch.randn(8, 16)
    a = _write_ckpt(tmp_path / "a.safetensors", {"l.weight": w}, {"l.weight": nm_mask(w, P24, 1)})
    p48 = Pattern(4, 8)
    b = _write_ckpt(tmp_path / "b.safetensors", {"l.weight": w}, {"l.weight": nm_mask(w, p48, 1)}, pattern=p48)
    with pytest.raises(MismatchError, match=r"pattern.*l\.weight 2:4 along axis 1 vs 4:8 along axis 1"):
        sad_report([str(a), str(b)])
    # a derived 4:8 rule against a stored 2:4 checkpoint is the same mismatch
    with pytest.raises(MismatchError, match="pattern"):
        sad_report([str(a), py_source("tiny_mlp")], pattern=p48)


def test_mismatch_in_a_later_pair_is_found_before_reading(tmp_path: Path) -> None:
    w, m = _random_24((8, 16), 0)
    a = _write_ckpt(tmp_path / "a.safetensors", {"l.weight": w}, {"l.weight": m})
    b = _write_ckpt(tmp_path / "b.safetensors", {"l.weight": w}, {"l.weight": m})
    c = _write_ckpt(tmp_path / "c.safetensors", {"l.weight": w}, {"l.weight": m}, extra={"z": torch.zeros(2)})
    with pytest.raises(MismatchError, match=r"b\.safetensors and .*c\.safetensors cannot be compared.*z"):
        sad_report([str(a), str(b), str(c)])


def test_layer_pruned_in_one_only_is_reported(tmp_path: Path) -> None:
    w1, m1 = _random_24((8, 16), 0)
    w2, m2 = _random_24((8, 16), 1)
    a = _write_ckpt(tmp_path / "a.safetensors", {"l1.weight": w1, "l2.weight": w2}, {"l1.weight": m1, "l2.weight": m2})
    b = _write_ckpt(tmp_path / "b.safetensors", {"l1.weight": w1, "l2.weight": w2}, {"l1.weight": m1})
    result = sad_report([str(a), str(b)]).pairs[0]
    assert [x.param for x in result.layers] == ["l1.weight"]
    assert [(x.param, x.pruned_in, x.pruned, x.total) for x in result.one_sided] == [("l2.weight", "a", 64, 128)]
    assert result.to_json()["one_sided"][0]["pruned_in"] == "a"


def test_corrupt_mask_is_a_checkpoint_error(tmp_path: Path) -> None:
    w, m = _random_24((8, 16), 0)
    good = _write_ckpt(tmp_path / "a.safetensors", {"l.weight": w}, {"l.weight": m})
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
        metadata = fh.metadata()
    tensors["__nmcli__/mask/l.weight"] = torch.full_like(tensors["__nmcli__/mask/l.weight"], 255)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    with pytest.raises(CheckpointError, match="more than 2:4 allows"):
        sad_report([str(good), str(bad)])
    tensors["__nmcli__/mask/l.weight"] = tensors["__nmcli__/mask/l.weight"][:3].clone()
    save_file(tensors, str(bad), metadata=metadata)
    with pytest.raises(CheckpointError, match="packed mask has shape"):
        sad_report([str(good), str(bad)])


def test_numpy_reader_reads_masks_and_compressed_files(tmp_path: Path) -> None:
    from nmcli.formats.checkpoint import CheckpointReader
    from nmcli.formats.open import compress_checkpoint

    w, m = _random_24((8, 16), 3)
    path = _write_ckpt(tmp_path / "a.safetensors", {"l.weight": w}, {"l.weight": m})
    expected = pack_mask(m).numpy()
    with CheckpointReader(path, numpy=True) as reader:
        assert reader.is_nmcli and reader.shape("l.weight") == (8, 16)
        got = reader.packed_mask_array("l.weight")
        assert isinstance(got, np.ndarray) and got.dtype == np.uint8 and np.array_equal(got, expected)
    packed = compress_checkpoint(path, tmp_path / "a-compressed.safetensors")
    with CheckpointReader(packed, numpy=True) as reader:  # decoded with numpy, same masks
        assert np.array_equal(reader.packed_mask_array("l.weight"), expected)
    assert sad_report([str(path), str(packed)]).pairs[0].sad == 0

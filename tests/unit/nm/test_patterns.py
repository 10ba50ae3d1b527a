"""N:M patterns: parsing, masks pinned against hand-computed cases, eligibility, compliance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nmcli.nm.masks
from fixtures.models import tiny_attention, tiny_cnn
from nmcli.errors import PatternError
from nmcli.models.layers import CONV, HF_CONV1D, LINEAR, MHA, LayerCandidate, find_layers, tensorrt_usable
from nmcli.nm.masks import apply_mask, group_counts, is_compliant, nm_mask, stored_nonzero
from nmcli.nm.pattern import Pattern, parse_pattern, pattern_note

P24, P14, P48, P28 = Pattern(2, 4), Pattern(1, 4), Pattern(4, 8), Pattern(2, 8)


def _bools(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# Parsing


@pytest.mark.parametrize(
    ("text", "n", "m"),
    [("2:4", 2, 4), (" 1 : 4 ", 1, 4), ("4:8", 4, 8), ("2:8", 2, 8), ("1:16", 1, 16), ("31:32", 31, 32)],
)
def test_parse_pattern_accepts_n_m(text: str, n: int, m: int) -> None:
    pattern = parse_pattern(text)
    assert (pattern.n, pattern.m) == (n, m)
    assert str(pattern) == f"{n}:{m}"
    assert pattern.slug == f"{n}of{m}"
    assert parse_pattern(pattern) is pattern


@pytest.mark.parametrize("text", ["", "2", "2:4:8", "2-4", "two:four", "2:4x", "-1:4", "2.0:4"])
def test_parse_pattern_rejects_malformed_text(text: str) -> None:
    with pytest.raises(PatternError, match="malformed pattern"):
        parse_pattern(text)


@pytest.mark.parametrize("text", ["0:4", "4:4", "4:2", "2:33", "1:64"])
def test_parse_pattern_rejects_out_of_range(text: str) -> None:
    with pytest.raises(PatternError, match=r"0 < N < M <= 32"):
        parse_pattern(text)


def test_only_2_4_is_accelerated() -> None:
    assert P24.accelerated and pattern_note(P24) is None
    for other in (P14, P48, P28):
        assert not other.accelerated
        note = pattern_note(other)
        assert note is not None and "only 2:4" in note
    assert P48.density == 0.5 and P14.density == 0.25


# --------------------------------------------------------------------------------------------
# Masks along the input dimension, hand-computed


def test_2_4_keeps_two_largest_magnitudes_per_group() -> None:
    w = torch.tensor([[0.1, -0.9, 0.5, 0.2, 3.0, -4.0, 0.0, 1.0]])
    assert torch.equal(nm_mask(w, P24, 1), _bools([[0, 1, 1, 0, 1, 1, 0, 0]]))


def test_ties_go_to_the_lower_index() -> None:
    w = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0],  # all equal -> the first two
            [0.5, -2.0, 2.0, 0.5],  # |-2| == |2| -> both kept, ahead of the 0.5s
            [3.0, 1.0, 1.0, 1.0],  # 3 and then the first 1
            [1.0, 1.0, 3.0, 1.0],  # 3 and then the first 1
            [0.0, 0.0, 0.0, 0.0],  # all zero -> the first two
            [-1.0, 1.0, -1.0, 1.0],  # sign does not matter
        ]
    )
    expected = _bools([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
    assert torch.equal(nm_mask(w, P24, 1), expected)


def test_1_4_mask() -> None:
    w = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0], [7.0, 7.0, -8.0, 1.0, 2.0, 2.0, 2.0, 2.0]])
    expected = _bools([[0, 1, 0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 1, 0, 0, 0]])
    assert torch.equal(nm_mask(w, P14, 1), expected)


def test_4_8_mask() -> None:
    w = torch.tensor([[8.0, -1.0, 7.0, 2.0, -6.0, 3.0, 5.0, 4.0]])
    assert torch.equal(nm_mask(w, P48, 1), _bools([[1, 0, 1, 0, 1, 0, 1, 0]]))


def test_2_8_mask() -> None:
    w = torch.tensor([[0.1, 0.2, -0.8, 0.3, 0.4, 0.9, 0.5, 0.6], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0]])
    assert torch.equal(nm_mask(w, P28, 1), _bools([[0, 0, 1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0, 1]]))


def test_linear_groups_run_along_in_not_out() -> None:
    # [out=4, in=4]: along `in` (axis 1) each row keeps its own two; along `out` it would differ.
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0], [8.0, 7.0, 6.0, 5.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 9.0]])
    assert torch.equal(nm_mask(w, P24, 1), _bools([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 1]]))
    assert torch.equal(nm_mask(w, P24, 0), _bools([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1]]))


def test_conv_groups_run_along_in_at_every_kernel_position() -> None:
    # Conv2d weight [out=1, in=4, kh=2, kw=2]; each kernel position has its own order of the 4 inputs.
    columns = {
        (0, 0): ([4.0, 3.0, 2.0, 1.0], [1, 1, 0, 0]),
        (0, 1): ([1.0, 2.0, 3.0, 4.0], [0, 0, 1, 1]),
        (1, 0): ([-5.0, 0.0, 5.0, 1.0], [1, 0, 1, 0]),
        (1, 1): ([0.0, 9.0, 0.0, 8.0], [0, 1, 0, 1]),
    }
    w = torch.zeros(1, 4, 2, 2)
    expected = torch.zeros(1, 4, 2, 2, dtype=torch.bool)
    for (i, j), (values, keep) in columns.items():
        w[0, :, i, j] = torch.tensor(values)
        expected[0, :, i, j] = torch.tensor(keep, dtype=torch.bool)
    mask = nm_mask(w, P24, 1)
    assert torch.equal(mask, expected)
    # Every kernel position holds exactly 2 of 4 along `in`, which flattening in*kh*kw would not give.
    assert torch.equal(group_counts(mask, 4, 1), torch.full((1, 2, 2, 1), 2, dtype=torch.int32))


def test_conv1d_and_conv3d_layouts() -> None:
    w1 = torch.tensor([[[1.0, 4.0], [2.0, 3.0], [3.0, 2.0], [4.0, 1.0]]])  # [out=1, in=4, k=2]
    assert torch.equal(nm_mask(w1, P24, 1)[0], _bools([[0, 1], [0, 1], [1, 0], [1, 0]]))
    w3 = torch.arange(1, 1 + 2 * 8 * 1 * 1 * 2, dtype=torch.float32).reshape(2, 8, 1, 1, 2)
    mask3 = nm_mask(w3, P24, 1)
    # Along `in` at each position the two largest of every 4 are the last two of the group.
    expected = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool).reshape(1, 8, 1, 1, 1).expand(2, 8, 1, 1, 2)
    assert torch.equal(mask3, expected)


def test_gpt2_conv1d_masks_along_dim_0() -> None:
    # transformers Conv1D stores [in=4, out=2]: groups run down each column.
    w = torch.tensor([[1.0, 9.0], [5.0, 1.0], [2.0, 8.0], [6.0, 0.0]])
    assert torch.equal(nm_mask(w, P24, 0), _bools([[0, 1], [1, 0], [0, 1], [1, 0]]))


def test_mask_shape_dtype_and_device_follow_the_weight() -> None:
    w = torch.randn(6, 16, dtype=torch.float16)
    mask = nm_mask(w, P24, 1)
    assert mask.dtype == torch.bool and mask.shape == w.shape and mask.is_contiguous()
    assert torch.equal(group_counts(mask, 4, 1), torch.full((6, 4), 2, dtype=torch.int32))


@pytest.mark.parametrize("pattern", [P24, P14, P48, P28, Pattern(3, 32)])
def test_sorting_in_slices_equals_one_sort(monkeypatch: pytest.MonkeyPatch, pattern: Pattern) -> None:
    w = torch.randn(8, 64, 3, generator=torch.Generator().manual_seed(2)).round(decimals=1)  # many ties
    whole = nm_mask(w, pattern, 1)
    monkeypatch.setattr(nmcli.nm.masks, "MASK_CHUNK_GROUPS", 5)  # slices that split rows
    assert torch.equal(nm_mask(w, pattern, 1), whole)
    assert torch.equal(
        group_counts(whole, pattern.m, 1), torch.full((8, 3, 64 // pattern.m), pattern.n, dtype=torch.int32)
    )


def test_stored_nonzero_sees_negative_zero() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        values = torch.tensor([0.0, -0.0, 1.0, -2.0], dtype=dtype)
        assert stored_nonzero(values).tolist() == [False, True, True, True]
    assert stored_nonzero(torch.tensor([0, 3])).tolist() == [False, True]


def test_mask_needs_input_dim_multiple_of_m() -> None:
    with pytest.raises(PatternError, match="not a multiple of M=4"):
        nm_mask(torch.ones(2, 6), P24, 1)
    with pytest.raises(PatternError, match="scalar"):
        nm_mask(torch.tensor(1.0), P24, 0)


def test_apply_mask_writes_positive_zero() -> None:
    w = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    effective = apply_mask(w, nm_mask(w, P24, 1))
    assert effective.tolist() == [[0.0, 0.0, -3.0, -4.0]]
    assert not torch.signbit(effective[0, :2]).any()


def test_group_counts_counts_negative_zero_as_nonzero() -> None:
    values = torch.tensor([[-0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert group_counts(values, 4, 1).tolist() == [[2], [0]]
    assert is_compliant(values, P24, 1)
    assert not is_compliant(values, P14, 1)
    assert not is_compliant(torch.zeros(2, 6), P24, 1)  # axis not a multiple of M


# --------------------------------------------------------------------------------------------
# Eligibility


def _by_param(model: nn.Module, pattern: Pattern = P24, **kw: list[str]) -> dict[str, LayerCandidate]:
    return {c.param: c for c in find_layers(model, pattern, **kw)}


def test_cnn_eligibility_and_reasons() -> None:
    layers = _by_param(tiny_cnn())
    assert list(layers) == ["0.weight", "2.weight", "5.weight", "8.weight", "10.weight"]
    stem, conv, grouped, fc1, fc2 = layers.values()
    assert not stem.eligible and "input dimension 3 is not a multiple of M=4" in stem.reason
    assert conv.eligible and conv.kind == CONV and conv.axis == 1
    assert not grouped.eligible and "groups=4" in grouped.reason
    assert fc1.eligible and fc1.kind == LINEAR and fc2.eligible
    # Biases and norm weights are never candidates.
    assert not any(p.endswith("bias") for p in layers) and "3.weight" not in layers


def test_include_and_exclude_globs() -> None:
    only_linear = _by_param(tiny_cnn(), include=["8", "10"])
    assert [p for p, c in only_linear.items() if c.eligible] == ["8.weight", "10.weight"]
    assert only_linear["2.weight"].reason == "not matched by --include"
    no_head = _by_param(tiny_cnn(), exclude=["1?"])
    assert no_head["10.weight"].reason == "matched by --exclude"
    assert no_head["8.weight"].eligible


def test_multihead_attention_in_proj_is_a_candidate() -> None:
    layers = _by_param(tiny_attention())
    in_proj = layers["attn.in_proj_weight"]
    assert in_proj.kind == MHA and in_proj.shape == (96, 32) and in_proj.axis == 1 and in_proj.eligible
    assert layers["attn.out_proj.weight"].eligible and layers["head.weight"].eligible
    mask = nm_mask(tiny_attention().attn.in_proj_weight, P24, 1)
    assert torch.equal(group_counts(mask, 4, 1), torch.full((96, 8), 2, dtype=torch.int32))


def test_mha_with_separate_projections() -> None:
    mha = nn.MultiheadAttention(8, 2, kdim=12, vdim=4)
    layers = _by_param(mha)
    assert {p for p in layers if p.endswith("proj_weight")} == {"q_proj_weight", "k_proj_weight", "v_proj_weight"}
    assert layers["k_proj_weight"].shape == (8, 12)
    assert all(layers[p].eligible for p in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))


def test_embeddings_and_tied_weights_are_never_pruned() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(16, 8)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 16, bias=False)
            self.head.weight = self.emb.weight

    layers = _by_param(Tied())
    assert list(layers) == ["head.weight"]
    assert not layers["head.weight"].eligible and "tied to an embedding" in layers["head.weight"].reason


def test_transposed_conv_is_skipped() -> None:
    layers = _by_param(nn.ConvTranspose2d(8, 8, 3))
    assert not layers["weight"].eligible and "transposed" in layers["weight"].reason


def test_gpt2_conv1d_eligible_along_dim_0(tiny_gpt2_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    layers = _by_param(model)
    c_attn = layers["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.kind == HF_CONV1D and c_attn.axis == 0 and c_attn.shape == (32, 96) and c_attn.eligible
    c_proj = layers["transformer.h.0.mlp.c_proj.weight"]
    assert c_proj.shape == (128, 32) and c_proj.axis == 0
    assert not layers["lm_head.weight"].eligible  # tied to wte


# --------------------------------------------------------------------------------------------
# TensorRT


@pytest.mark.parametrize(
    ("shape", "axis", "compliant", "usable"),
    [
        ((64, 64), 1, True, True),
        ((64, 64), 1, False, False),
        ((64, 32), 1, True, False),  # reduction below 64
        ((10, 256), 1, True, False),  # outputs not a multiple of 32
        ((256, 96), 0, True, True),  # Conv1D [in, out]
        ((128, 64, 3, 3), 1, True, True),
        ((64,), 0, True, False),
    ],
)
def test_tensorrt_usable(shape: tuple[int, ...], axis: int, compliant: bool, usable: bool) -> None:
    assert tensorrt_usable(shape, axis, compliant) is usable


def test_l1_norm_is_exact_across_slices_and_count_kept_counts() -> None:
    from nmcli.nm.masks import count_kept, l1_norm

    g = torch.Generator().manual_seed(0)
    values = torch.randn(5_000_001, generator=g).to(torch.bfloat16)  # more than one slice, a ragged last one
    exact = float(values.double().abs().sum())
    assert abs(l1_norm(values) - exact) <= 1e-6 * exact
    assert l1_norm(torch.zeros(0)) == 0.0
    mask = values > 0
    assert count_kept(mask) == int(mask.long().sum())


def _sorted_mask(w: torch.Tensor, pattern: Pattern, axis: int) -> torch.Tensor:
    """The N:M rule written the obvious way: a stable descending sort of |w| per group (the reference)."""
    moved = w.movedim(axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // pattern.m, pattern.m)
    order = torch.sort(groups.abs(), dim=-1, descending=True, stable=True).indices[..., : pattern.n]
    keep = torch.zeros(groups.shape, dtype=torch.bool).scatter_(-1, order, True)
    return keep.reshape(moved.shape).movedim(-1, axis)


_EDGE_VALUES = [0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, float("inf"), float("-inf"), float("nan"), 0.5, -0.5, 65504.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("pattern", [P24, P14, P28, P48, Pattern(3, 4), Pattern(1, 2), Pattern(5, 32)])
def test_key_selection_equals_a_stable_sort(dtype: torch.dtype, pattern: Pattern) -> None:
    gen = torch.Generator().manual_seed(pattern.m * 7 + pattern.n)
    w = torch.randn(32, 4 * 32, generator=gen).round(decimals=1).to(dtype)  # many ties in magnitude
    edges = torch.tensor(_EDGE_VALUES, dtype=torch.float32).to(dtype)
    w.view(-1)[: 3 * len(edges) : 3] = edges  # zeros of both signs, subnormals, inf and NaN mixed in
    w[3] = w[3, 0]  # a row of equal values: the lowest indices win
    for axis in (0, 1):
        assert torch.equal(nm_mask(w, pattern, axis), _sorted_mask(w, pattern, axis)), (dtype, pattern, axis)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.lists(st.integers(0, 0xFFFF), min_size=8, max_size=64),
    n=st.integers(1, 7),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
)
def test_key_selection_equals_a_stable_sort_for_any_bit_pattern(bits: list[int], n: int, dtype: torch.dtype) -> None:
    # Every 16-bit pattern is a value: NaNs with any payload, infinities, subnormals, -0.0.
    usable = len(bits) // 8 * 8
    values = torch.tensor(bits[:usable], dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 8)
    pattern = Pattern(n, 8)
    assert torch.equal(nm_mask(values, pattern, 1), _sorted_mask(values, pattern, 1))

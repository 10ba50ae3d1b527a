"""Block-by-block calibration stops each group's pass early only when that cannot change its statistics,
and the layers after the blocks see what the whole pruned model would feed them (issue 24)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nmcli.algorithms.config import CalibrationConfig
from nmcli.algorithms.solve import solve_layer
from nmcli.algorithms.statistics import Segment
from nmcli.formats.checkpoint import SourceRef
from nmcli.models.data import Batch
from nmcli.models.layers import LINEAR, MHA, LayerCandidate
from nmcli.nm.masks import nm_mask
from nmcli.nm.pattern import parse_pattern
from nmcli.pipelines.blocks import PATH_BLOCKS
from nmcli.pipelines.inmemory import prune_model

P24 = parse_pattern("2:4")


class _Reuse(nn.Module):
    """``fc1`` runs before and after ``fc2``: its statistics need the whole pass."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8, bias=False)
        self.fc2 = nn.Linear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(self.fc2(self.fc1(x)))


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Reuse(), _Reuse()])
        self.head = nn.Linear(8, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _wanda(weight: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """Wanda's mask by hand: |W| times the L2 norm of each input column over every call's inputs."""
    norms = sum(x.double().pow(2).sum(0) for x in inputs)
    assert isinstance(norms, torch.Tensor)
    return nm_mask(weight.double().abs() * norms.sqrt().unsqueeze(0), P24, 1)


def _sparsegpt(weight: torch.Tensor, *calls: torch.Tensor) -> torch.Tensor:
    """SparseGPT's mask from the Gram matrix of ``calls`` (added in the order the pipeline sees them)."""
    segment = Segment(slice(None))
    for x in calls:
        segment.add(x)
    cand = LayerCandidate("blocks.0.fc1", "blocks.0.fc1.weight", LINEAR, tuple(weight.shape), 1, True, "")
    return solve_layer(weight.detach(), cand, [segment], P24, "sparsegpt", CalibrationConfig(spec="tensors:x")).mask


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_layer_called_again_after_the_next_group_keeps_all_its_inputs(method: str) -> None:
    """Wanda collects the whole dense block in one pass; SparseGPT's group pass for fc1 must not stop at fc2."""
    torch.manual_seed(0)
    model = _Stack().eval()
    x = torch.randn(64, 8) * torch.tensor([10.0, 0.1] * 4)  # column norms that fc2's outputs do not share
    block = model.blocks[0]
    with torch.no_grad():
        second = block.fc2(block.fc1(x))
    if method == "wanda":
        expected = _wanda(block.fc1.weight, x, second)
        assert not torch.equal(expected, _wanda(block.fc1.weight, x))  # the second call's inputs decide the mask
    else:
        expected = _sparsegpt(block.fc1.weight, x[:32], second[:32], x[32:], second[32:])
        assert not torch.equal(expected, _sparsegpt(block.fc1.weight, x[:32], x[32:]))
    result = prune_model(
        model, P24, source=SourceRef("py:x:y"), method=method, calibration=CalibrationConfig(spec="tensors:x"),
        batches=[Batch((x[:32],)), Batch((x[32:],))],
    )  # fmt: skip
    assert result.calibration_path == PATH_BLOCKS
    assert torch.equal(result.checkpoint.masks["blocks.0.fc1.weight"], expected)


def test_the_head_after_the_blocks_sees_the_pruned_blocks_outputs() -> None:
    torch.manual_seed(1)
    model = _Stack().eval()
    x = torch.randn(64, 8)
    result = prune_model(
        model, P24, source=SourceRef("py:x:y"), method="wanda", calibration=CalibrationConfig(spec="tensors:x"),
        batches=[Batch((x[:32],)), Batch((x[32:],))],
    )  # fmt: skip
    pruned = _Stack().eval()
    pruned.load_state_dict(result.checkpoint.tensors)
    with torch.no_grad():
        hidden = pruned.blocks[1](pruned.blocks[0](x))
    assert torch.equal(result.checkpoint.masks["head.weight"], _wanda(model.head.weight, hidden))


class _Attention(nn.Module):
    """``nn.MultiheadAttention`` with a key padding mask: its in-projection's q rows see every token,
    its k and v rows only the unpadded ones."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, bias=False)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]


def test_attention_in_projection_rows_take_their_own_inputs() -> None:
    torch.manual_seed(2)
    model = _Attention().eval()
    x = torch.randn(2, 6, 8) * torch.tensor([5.0, 0.2] * 4)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 3:] = True
    x[1, 3:] *= 40  # padded positions that would dominate the key/value statistics if counted
    result = prune_model(
        model, P24, source=SourceRef("py:x:y"), method="sparsegpt", include=["attn"],
        calibration=CalibrationConfig(spec="tensors:x"), batches=[Batch((x, pad))],
    )  # fmt: skip
    weight = model.attn.in_proj_weight.detach()
    segments = [Segment(slice(0, 8)), Segment(slice(8, 16)), Segment(slice(16, 24))]
    segments[0].add(x.reshape(-1, 8))
    for segment in segments[1:]:
        segment.add(x[~pad])
    cand = LayerCandidate("attn", "attn.in_proj_weight", MHA, tuple(weight.shape), 1, True, "")
    expected = solve_layer(weight, cand, segments, P24, "sparsegpt", CalibrationConfig(spec="tensors:x")).mask
    assert torch.equal(result.checkpoint.masks["attn.in_proj_weight"], expected)
    segments = [Segment(slice(0, 8)), Segment(slice(8, 16)), Segment(slice(16, 24))]
    for segment in segments:
        segment.add(x.reshape(-1, 8))
    counted = solve_layer(weight, cand, segments, P24, "sparsegpt", CalibrationConfig(spec="tensors:x")).mask
    assert not torch.equal(counted, expected)  # the padded positions would have changed the k/v masks

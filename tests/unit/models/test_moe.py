"""Mixture-of-experts: expert stacks pruned per expert along their input dim, routers never pruned,
SR-STE on 3-D expert parameters, and causal-LM labels for ``input_ids`` data."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nmcli.algorithms.srste import SparseTraining
from nmcli.formats.checkpoint import LayerEntry
from nmcli.models.data import Batch, TensorExamples, TrainData, causal_lm_labels
from nmcli.models.layers import EXPERTS, ROUTER, find_layers, tensorrt_usable
from nmcli.nm.masks import is_compliant, nm_mask
from nmcli.nm.pattern import Pattern

P24 = Pattern(2, 4)


class TinyExperts(nn.Module):
    """Experts stored as transformers 5 does: ``up [E, out, in]``, ``down [E, in', out']`` (input dim last)."""

    def __init__(self, experts: int = 2, hidden: int = 8, inner: int = 8, transposed: bool = False) -> None:
        super().__init__()
        self.num_experts = experts
        self.is_transposed = transposed
        up = torch.randn(experts, inner, hidden)
        down = torch.randn(experts, hidden, inner)
        self.up = nn.Parameter(up.transpose(1, 2).contiguous() if transposed else up)
        self.down = nn.Parameter(down.transpose(1, 2).contiguous() if transposed else down)
        self.up_bias = nn.Parameter(torch.zeros(experts, inner))  # expert biases are biases: never candidates

    def forward(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            rows = expert == e
            up, down = (self.up[e].T, self.down[e].T) if self.is_transposed else (self.up[e], self.down[e])
            out[rows] = F.linear(torch.relu(F.linear(x[rows], up, self.up_bias[e])), down)
        return out


class TinyMoeBlock(nn.Module):
    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gate = nn.Linear(8, 2, bias=False)  # the router
        self.experts = TinyExperts(transposed=transposed)
        self.shared_expert = nn.Linear(8, 8)
        self.shared_expert_gate = nn.Linear(8, 1)
        self.gate_proj = nn.Linear(8, 8)  # not a router: only gate, *_gate, router... are

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expert = self.gate(x).argmax(-1)
        return self.experts(x, expert) + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class TopKRouter(nn.Module):
    """A router that is not a Linear (transformers 5: ``MixtralTopKRouter.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 8))


def _by_param(model: nn.Module, pattern: Pattern = P24) -> dict[str, tuple[str, int, bool, str]]:
    return {c.param: (c.kind, c.axis, c.eligible, c.reason) for c in find_layers(model, pattern)}


def test_expert_stacks_are_candidates_along_their_last_dim_and_routers_are_skipped() -> None:
    found = _by_param(TinyMoeBlock())
    assert found["experts.up"] == (EXPERTS, 2, True, "")
    assert found["experts.down"] == (EXPERTS, 2, True, "")
    assert "experts.up_bias" not in found
    assert found["gate.weight"][2:] == (False, "router")
    assert found["shared_expert_gate.weight"][2:] == (False, "router")
    assert found["shared_expert.weight"][2] is True
    assert found["gate_proj.weight"][2] is True


def test_transposed_experts_group_along_dim_1() -> None:
    found = _by_param(TinyMoeBlock(transposed=True))
    assert found["experts.up"][:3] == (EXPERTS, 1, True)


def test_gate_named_linear_outside_an_moe_block_is_an_ordinary_layer() -> None:
    model = nn.Sequential()
    model.add_module("gate", nn.Linear(8, 2))
    assert _by_param(model)["gate.weight"][2] is True


def test_router_classes_are_listed_and_skipped_anywhere() -> None:
    model = nn.Module()
    model.router = TopKRouter()
    assert _by_param(model)["router.weight"] == (ROUTER, 1, False, "router")


def test_linear_with_fewer_outputs_than_m_in_an_moe_block_is_a_router() -> None:
    block = TinyMoeBlock()
    block.add_module("score", nn.Linear(8, 2))
    assert _by_param(block)["score.weight"][2:] == (False, "router")
    assert _by_param(block, Pattern(1, 2))["score.weight"][2] is True  # 2 outputs, M=2: not fewer than M


def test_expert_input_not_a_multiple_of_m_is_skipped_with_the_reason() -> None:
    block = TinyMoeBlock()
    block.experts.down = nn.Parameter(torch.randn(2, 8, 6))
    kind, axis, eligible, reason = _by_param(block)["experts.down"]
    assert (kind, axis, eligible) == (EXPERTS, 2, False)
    assert reason == "input dimension 6 is not a multiple of M=4"


def test_nm_mask_of_an_expert_stack_is_per_expert_along_the_last_dim() -> None:
    weight = torch.tensor(
        [
            [[1.0, -4.0, 3.0, 2.0], [0.5, 0.1, -0.2, 0.3]],
            [[-1.0, 1.0, 1.0, -1.0], [9.0, 8.0, -7.0, 6.0]],
        ]
    )
    expected = torch.tensor(
        [
            [[False, True, True, False], [True, False, False, True]],
            [[True, True, False, False], [True, True, False, False]],  # ties: lower index wins
        ]
    )
    assert torch.equal(nm_mask(weight, P24, 2), expected)


def test_tensorrt_usable_reads_an_expert_stack_as_out_by_in() -> None:
    assert tensorrt_usable((8, 64, 128), 2, True)  # [E, out=64, in=128]
    assert not tensorrt_usable((8, 48, 128), 2, True)  # 48 outputs: not a multiple of 32


@pytest.mark.parametrize("lambda_w", [0.0, 0.5])
def test_srste_on_3d_expert_parameters_matches_the_hand_written_gradient(lambda_w: float) -> None:
    block = TinyMoeBlock()
    dense = block.experts.up.detach().clone()
    entries = [
        LayerEntry(c.param, c.module, 2, 4, c.axis, c.shape) for c in find_layers(block, P24) if c.kind == EXPERTS
    ]
    sparse = SparseTraining(block, entries, lambda_w=lambda_w)
    mask = nm_mask(dense, P24, 2)
    assert torch.equal(block.experts.up, torch.where(mask, dense, torch.zeros(())))
    assert is_compliant(block.experts.up.detach(), P24, 2)
    x = torch.randn(6, 8)
    block(x).sum().backward()
    up = next(sp for sp in sparse if sp.param == "experts.up")
    assert up.dense.grad is not None
    # The gradient reaching W~ flows straight through; pruned elements also get lambda_w * W.
    w_eff = torch.where(mask, dense, torch.zeros(())).requires_grad_(True)
    expert = block.gate(x).argmax(-1)
    ref = torch.zeros_like(x)
    down = block.experts.down.detach()
    for e in range(2):
        rows = expert == e
        ref[rows] = F.linear(torch.relu(F.linear(x[rows], w_eff[e], block.experts.up_bias[e].detach())), down[e])
    ref.sum().backward()
    expected = w_eff.grad + lambda_w * (~mask).float() * dense
    torch.testing.assert_close(up.dense.grad, expected, rtol=0, atol=1e-6)
    state = sparse.state_dict()
    assert torch.equal(state["experts.up"], torch.where(mask, dense, torch.zeros(())))
    sparse.remove()
    assert torch.equal(block.experts.up.detach(), dense)


def test_causal_lm_labels_copy_input_ids_and_ignore_padding() -> None:
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = causal_lm_labels(Batch((), {"input_ids": ids, "attention_mask": mask}))
    assert torch.equal(out.kwargs["labels"], torch.tensor([[5, 6, 7], [8, 9, -100]]))
    with_targets = Batch((), {"input_ids": ids}, torch.tensor([1, 0]))
    assert causal_lm_labels(with_targets) is with_targets
    images = Batch((torch.zeros(2, 3),))
    assert causal_lm_labels(images) is images


def test_train_data_gives_labels_to_tensors_batches_only_when_asked() -> None:
    ids = torch.arange(12).reshape(4, 3)
    examples = TensorExamples((), {"input_ids": ids}, None)
    plain = TrainData("tensors:x", examples=examples)
    assert "labels" not in plain.take([0, 1]).kwargs
    causal = TrainData("tensors:x", examples=examples, causal_lm_labels=True)
    assert torch.equal(causal.take([2, 3]).kwargs["labels"], ids[2:])
    batches = TrainData("py:x", batches=[{"input_ids": ids}], causal_lm_labels=True)
    assert torch.equal(next(batches.iter_batches()).kwargs["labels"], ids)

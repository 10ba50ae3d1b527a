"""SR-STE autograd and the sparse-training wrapper, checked against hand-written updates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fixtures.models import tiny_attention, tiny_cnn
from nmcli.algorithms.srste import SparseTraining, refined_grad, srste
from nmcli.formats.checkpoint import LayerEntry
from nmcli.models.layers import find_layers
from nmcli.nm.masks import is_compliant, nm_mask
from nmcli.nm.pattern import Pattern


def _entries(model: nn.Module, pattern: Pattern) -> list[LayerEntry]:
    return [
        LayerEntry(c.param, c.module, pattern.n, pattern.m, c.axis, c.shape)
        for c in find_layers(model, pattern)
        if c.eligible
    ]


def test_srste_forward_is_masked_and_backward_adds_refinement() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4, 8, requires_grad=True)
    mask = nm_mask(weight, Pattern(2, 4), 1)
    out = srste(weight, mask, lambda_w=0.5)
    assert torch.equal(out, torch.where(mask, weight, torch.zeros(())))
    assert not torch.signbit(out[~mask]).any()  # exact +0.0 where pruned
    upstream = torch.randn(4, 8)
    out.backward(upstream)
    expected = upstream + 0.5 * (~mask).float() * weight.detach()
    torch.testing.assert_close(weight.grad, expected, rtol=0, atol=0)


def test_plain_ste_passes_gradient_straight_through() -> None:
    weight = torch.randn(3, 4, requires_grad=True)
    mask = nm_mask(weight, Pattern(1, 4), 1)
    upstream = torch.randn(3, 4)
    srste(weight, mask, lambda_w=0.0).backward(upstream)
    assert torch.equal(weight.grad, upstream)
    assert torch.equal(refined_grad(upstream, weight, mask, 0.0), upstream)


@pytest.mark.parametrize("lambda_w", [0.0, 2e-2])
def test_one_step_matches_hand_written_update(lambda_w: float) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 3)
    dense0, bias0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    x, target = torch.randn(5, 8), torch.randn(5, 3)
    pattern = Pattern(2, 4)
    mask = nm_mask(dense0, pattern, 1)
    # Hand-written: loss on the effective weight, gradient w.r.t. it, SR-STE term on pruned weights.
    w_eff = (dense0 * mask).requires_grad_(True)
    b = bias0.clone().requires_grad_(True)
    ((x @ w_eff.T + b - target) ** 2).mean().backward()
    lr = 0.1
    expected_w = dense0 - lr * (w_eff.grad + lambda_w * (~mask).float() * dense0)
    expected_b = bias0 - lr * b.grad

    sparse = SparseTraining(layer, [LayerEntry("weight", "", 2, 4, 1, (3, 8))], lambda_w=lambda_w)
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr)
    ((layer(x) - target) ** 2).mean().backward()
    optimizer.step()
    sparse.step()
    torch.testing.assert_close(sparse.dense_weights()["weight"], expected_w)
    torch.testing.assert_close(layer.bias.detach(), expected_b)
    assert torch.equal(sparse.masks()["weight"], nm_mask(expected_w, pattern, 1))


def test_refinement_once_per_step_equals_refinement_in_backward() -> None:
    torch.manual_seed(1)
    results = []
    for in_backward in (True, False):
        layer = nn.Linear(8, 4)
        with torch.no_grad():
            layer.weight.copy_(torch.arange(32.0).reshape(4, 8).sin())
        sparse = SparseTraining(
            layer, [LayerEntry("weight", "", 2, 4, 1, (4, 8))], lambda_w=0.1, refine_in_backward=in_backward
        )
        layer(torch.ones(2, 8)).sum().backward()
        sparse.add_refinement()
        results.append(sparse.params[0].dense.grad.clone())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_mask_recomputed_every_interval() -> None:
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[4.0, 3.0, 2.0, 1.0]]))
    sparse = SparseTraining(layer, [LayerEntry("weight", "", 2, 4, 1, (1, 4))], mask_interval=3)
    start = sparse.masks()["weight"].clone()
    assert start.tolist() == [[True, True, False, False]]
    recomputed, masks = [], []
    for _ in range(6):
        with torch.no_grad():  # move the dense weights so the magnitude order flips every step
            sparse.params[0].dense.copy_(sparse.params[0].dense.flip(-1))
        recomputed.append(sparse.step())
        masks.append(sparse.masks()["weight"].tolist())
    assert recomputed == [False, False, True, False, False, True]
    low, high = [[True, True, False, False]], [[False, False, True, True]]
    # steps 1-2 keep the starting mask; step 3 follows the (flipped) dense weights; step 6 again
    assert masks == [low, low, high, high, high, low]


def test_works_on_conv_mha_and_keeps_state_dict_names() -> None:
    for factory, x in ((tiny_cnn, torch.randn(2, 3, 8, 8)), (tiny_attention, torch.randn(2, 5, 32))):
        model = factory()
        names = list(model.state_dict())
        entries = _entries(model, Pattern(2, 4))
        sparse = SparseTraining(model, entries)
        model.train()
        model(x).sum().backward()
        for sp in sparse:
            assert sp.dense.grad is not None and sp.dense.grad.abs().sum() > 0
        state = sparse.state_dict()
        assert list(state) == names
        for entry in entries:
            assert is_compliant(state[entry.param], entry.pattern, entry.axis)
        sparse.remove()
        assert set(model.state_dict()) == set(names)  # plain parameters again, no parametrizations


def test_hf_conv1d_masks_along_dim0(tiny_gpt2_dir: object) -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    entries = _entries(model, Pattern(2, 4))
    assert any(e.axis == 0 for e in entries)
    sparse = SparseTraining(model, entries)
    out = model(torch.randint(0, 128, (2, 6)), labels=torch.randint(0, 128, (2, 6)))
    out.loss.backward()
    state = sparse.state_dict()
    assert set(state) == set(transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).state_dict())
    for entry in entries:
        assert is_compliant(state[entry.param], entry.pattern, entry.axis)

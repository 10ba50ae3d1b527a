"""The inferred-layer rule (``nmcli.models.inferred.infer_layers``) and the pattern of stored zeros (``zero_pattern``).

Every expectation is written out by hand from the rule's text.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from nmcli.models.inferred import INFERRED, infer_layers, most_nonzeros, zero_pattern
from nmcli.models.layers import LayerCandidate
from nmcli.nm.pattern import Pattern

P24 = Pattern(2, 4)


def _reasons(entries: list[tuple[str, tuple[int, ...], bool]], pattern: Pattern = P24) -> dict[str, str]:
    return {c.param: c.reason for c in infer_layers(entries, pattern)}


def test_rule_takes_linear_and_conv_weights_only() -> None:
    entries = [
        ("features.0.weight", (16, 3, 3, 3), True),  # stem: 3 inputs
        ("features.1.weight", (32, 16, 3, 3), True),
        ("features.2.weight", (32, 1, 3, 3), True),  # depthwise
        ("features.2.bias", (32,), True),
        ("bn1.weight", (32,), True),
        ("bn1.running_mean", (32,), True),
        ("bn1.num_batches_tracked", (), False),
        ("classifier.weight", (10, 64), True),
        ("quant.weight", (10, 64), False),  # integer
        ("head.in_proj_weight", (96, 32), True),  # nn.MultiheadAttention
        ("fc.weight", (10, 6), True),
    ]
    reasons = _reasons(entries)
    assert [p for p, r in reasons.items() if not r] == ["features.1.weight", "classifier.weight", "head.in_proj_weight"]
    assert reasons["features.0.weight"] == "input dimension 3 is not a multiple of M=4"
    assert reasons["features.2.weight"] == "input dimension 1 (a depthwise conv)"
    assert reasons["features.2.bias"] == "not named *.weight (a bias, buffer or statistic)"
    assert reasons["bn1.weight"] == "1-D (a bias or norm scale)"
    assert reasons["bn1.running_mean"].startswith("not named *.weight")
    assert reasons["bn1.num_batches_tracked"] == "not a floating-point tensor"
    assert reasons["quant.weight"] == "not a floating-point tensor"
    assert reasons["fc.weight"] == "input dimension 6 is not a multiple of M=4"
    assert {c.kind for c in infer_layers(entries, P24)} == {INFERRED}
    assert {c.axis for c in infer_layers(entries, P24)} == {1}


@pytest.mark.parametrize(
    ("name", "word"),
    [
        ("embeddings.word_embeddings.weight", "embeddings"),
        ("wte.embed_tokens.weight", "embed"),
        ("encoder.layer.0.attention.output.LayerNorm.weight", "layernorm"),
        ("blocks.3.norm1.weight", "norm"),
        ("layer1.0.bn2.weight", "bn"),
        ("transformer.ln_f.weight", "ln"),
        ("pos.weight", "pos"),
        ("model.position_bias.weight", "position"),
    ],
)
def test_embeddings_norms_positional_tables_by_name(name: str, word: str) -> None:
    reason = _reasons([(name, (64, 64), True)])[name]
    assert reason == f"an embedding, norm or positional table by name ({word!r})"


@pytest.mark.parametrize(
    "name", ["post_proj.weight", "lnx.weight", "bnb.fc.weight", "encoder.layer.0.output.dense.weight"]
)
def test_words_that_only_look_alike_are_layers(name: str) -> None:
    assert _reasons([(name, (8, 8), True)])[name] == ""


def test_include_exclude_and_tied() -> None:
    entries = [("a.weight", (8, 8), True), ("b.weight", (8, 8), True), ("lm_head.weight", (8, 8), True)]
    got = infer_layers(entries, P24, exclude=["b"], tied=["lm_head.weight"])
    assert [(c.param, c.eligible, c.reason) for c in got] == [
        ("a.weight", True, ""),
        ("b.weight", False, "matched by --exclude"),
        ("lm_head.weight", False, "weight is tied to an embedding"),
    ]
    got = infer_layers(entries, P24, include=["a*"])
    assert [c.eligible for c in got] == [True, False, False]


def test_most_nonzeros_by_hand() -> None:
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0, 2.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0]])
    # pairs: [1,0][0,0][2,3][0,0] / [0,0][0,4][0,0][0,0] -> 2; quads: [1,0,0,0][2,3,0,0] -> 2; octets: 3
    assert most_nonzeros(w, 1) == {2: 2, 4: 2, 8: 3}
    assert most_nonzeros(torch.zeros(2, 6), 1) == {2: 0}


def _candidates(weights: dict[str, torch.Tensor]) -> Callable[[Pattern], list[LayerCandidate]]:
    entries = [(n, tuple(t.shape), True) for n, t in weights.items()]
    return lambda p: infer_layers(entries, p)


def test_zero_pattern_picks_the_sparsest_pattern_held() -> None:
    one_of_four = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]] * 2)
    two_of_four = torch.tensor([[1.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0, 0.0]] * 2)
    one_of_two = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 4.0, 0.0]] * 2)  # also 2:4: same density, 2:4 wins
    weights = {"a.weight": one_of_four, "b.weight": one_of_four.flip(1)}
    # 1:4 (density 1/4) beats 2:8 (also 1/4, same layers) by the smaller M, and 1:2 (1/2)
    assert zero_pattern(_candidates(weights), weights.__getitem__).pattern() == Pattern(1, 4)
    weights["b.weight"] = two_of_four
    assert zero_pattern(_candidates(weights), weights.__getitem__).pattern() == Pattern(2, 4)
    weights = {"a.weight": one_of_two}
    assert zero_pattern(_candidates(weights), weights.__getitem__).pattern() == Pattern(2, 4)
    weights["b.weight"] = two_of_four
    weights["c.weight"] = torch.ones(2, 8)
    assert zero_pattern(_candidates(weights), weights.__getitem__).pattern() is None

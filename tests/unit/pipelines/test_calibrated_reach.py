"""Calibrated pruning on models whose blocks change shape or do not chain (issue 24): the path taken,
and accuracy on scikit-learn digits well above magnitude's in eval mode."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from fixtures.digits import accuracy, digits_split, train_dense
from fixtures.models import cross_skip_mlp, efficientnet_liteish
from nmcli.algorithms.config import CalibrationConfig
from nmcli.formats.checkpoint import SourceRef
from nmcli.models.data import Batch
from nmcli.nm.pattern import parse_pattern
from nmcli.pipelines.blocks import PATH_BLOCKS, PATH_DENSE, PATH_STAGES
from nmcli.pipelines.inmemory import PruneResult, prune_model

pytest.importorskip("sklearn")


def _prune(model: nn.Module, method: str, x: torch.Tensor) -> PruneResult:
    data = {} if method == "magnitude" else {"calibration": CalibrationConfig(spec="digits"), "batches": _batches(x)}
    return prune_model(model, parse_pattern("2:4"), source=SourceRef("digits"), method=method, **data)  # type: ignore[arg-type]


def _batches(x: torch.Tensor) -> list[Batch]:
    return [Batch((x[i : i + 32],)) for i in range(0, 128, 32)]


def _scores(factory: Callable[[], nn.Module], images: bool) -> dict[str, tuple[float, PruneResult]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread is fastest, and never oversubscribed
    try:
        return _train_and_prune(factory, images)
    finally:
        torch.set_num_threads(threads)


def _train_and_prune(factory: Callable[[], nn.Module], images: bool) -> dict[str, tuple[float, PruneResult]]:
    x_train, x_test, y_train, y_test = digits_split(images=images)
    model = train_dense(factory(), x_train, y_train, epochs=4)
    scores = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        result = _prune(model, method, x_train)
        pruned = factory()
        pruned.load_state_dict(result.checkpoint.tensors)
        scores[method] = (accuracy(pruned, x_test, y_test), result)
    return scores


@pytest.fixture(scope="module")
def efficientnet_scores() -> dict[str, tuple[float, PruneResult]]:
    return _scores(efficientnet_liteish, images=True)


def test_mbconv_blocks_that_change_channels_chain(efficientnet_scores: dict[str, tuple[float, PruneResult]]) -> None:
    magnitude, _ = efficientnet_scores["magnitude"]
    for method in ("wanda", "sparsegpt"):
        score, result = efficientnet_scores[method]
        assert result.calibration_path == PATH_BLOCKS
        assert result.to_json()["calibration_path"] == "blocks" and result.bn_recalibrated
        assert any("block by block over the 4 blocks of blocks" in note for note in result.notes)
        assert score > magnitude + 0.3, (method, score, magnitude)
    assert efficientnet_scores["sparsegpt"][0] > 0.8


def test_magnitude_without_data_says_batchnorm_is_stale(
    efficientnet_scores: dict[str, tuple[float, PruneResult]],
) -> None:
    _, result = efficientnet_scores["magnitude"]
    assert result.calibration_path == "" and result.to_json()["calibration_path"] is None
    assert any("BatchNorm" in note and "--calib SPEC" in note for note in result.notes)


def test_blocks_with_a_cross_block_skip_are_pruned_as_stages() -> None:
    scores = _scores(cross_skip_mlp, images=False)
    for method in ("wanda", "sparsegpt"):
        score, result = scores[method]
        assert result.calibration_path == PATH_STAGES
        assert any("do not chain" in note for note in result.notes)
        assert len([layer for layer in result.layers if layer.status == "pruned"]) == 10
        assert score >= scores["magnitude"][0] - 0.02
    assert scores["sparsegpt"][0] > scores["magnitude"][0]


class _OnlyInsideItsParent(nn.Module):
    """A stage that runs only when its parent arms it: run on its own captured inputs, it raises."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16, bias=False)
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.armed:
            raise ValueError("called outside its parent")
        return torch.relu(self.fc(x))


class _Guarded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _OnlyInsideItsParent()
        self.head = nn.Linear(16, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inner.armed = True
        try:
            hidden = self.inner(x)
        finally:
            self.inner.armed = False
        return self.head(hidden)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_stage_that_fails_alone_falls_back_to_one_forward_and_says_so(method: str) -> None:
    torch.manual_seed(0)
    model = _Guarded().eval()
    x = torch.randn(128, 16)
    result = _prune(model, method, x)
    assert result.calibration_path == PATH_DENSE
    assert set(result.checkpoint.masks) == {"inner.fc.weight", "head.weight"}
    assert any("without error propagation" in note and "ValueError" in note for note in result.notes)

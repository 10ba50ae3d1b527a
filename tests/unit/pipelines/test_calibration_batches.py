"""Calibration batches: the same seeded examples, batched by token count for prune (less padding)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nmcli.algorithms.config import CalibrationConfig
from nmcli.pipelines.blocks import calibration_batches
from tests.conftest import save_tiny_bert


def _tokens(batches: list) -> Counter[tuple[int, ...]]:
    """Every example's real tokens (padding dropped), as a multiset."""
    out: Counter[tuple[int, ...]] = Counter()
    for batch in batches:
        ids, mask = batch.kwargs["input_ids"], batch.kwargs["attention_mask"]
        for row, keep in zip(ids, mask, strict=True):
            out[tuple(row[keep.bool()].tolist())] += 1
    return out


def test_by_length_batches_the_same_examples_with_less_padding(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    folder = save_tiny_bert(tmp_path / "bert")
    vocab = [f"w{i}" for i in range(60)]
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *vocab]) + "\n")
    lines = [" ".join(vocab[: 1 + (7 * i) % 13]) for i in range(40)]
    (tmp_path / "calib.txt").write_text("\n".join(lines) + "\n")
    cfg = CalibrationConfig(spec=f"text:{tmp_path / 'calib.txt'}", samples=32, batch_size=8, max_length=16)
    plain = calibration_batches(cfg, source_spec=f"hf:{folder}", input_shape=None)
    sorted_ = calibration_batches(cfg, source_spec=f"hf:{folder}", input_shape=None, by_length=True)
    assert _tokens(plain) == _tokens(sorted_) and sum(_tokens(plain).values()) == 32
    positions = [sum(b.kwargs["attention_mask"].numel() for b in batches) for batches in (plain, sorted_)]
    assert positions[1] < positions[0]
    lengths = [int(m.sum()) for b in sorted_ for m in b.kwargs["attention_mask"]]
    assert lengths == sorted(lengths)


def test_by_length_leaves_data_without_a_mask_in_shuffle_order(tmp_path: Path) -> None:
    save_file({"inputs": torch.arange(40.0).reshape(20, 2)}, str(tmp_path / "x.safetensors"))
    cfg = CalibrationConfig(spec=f"tensors:{tmp_path / 'x.safetensors'}", samples=12, batch_size=5)
    plain = calibration_batches(cfg, source_spec="py:x:y", input_shape=None)
    same = calibration_batches(cfg, source_spec="py:x:y", input_shape=None, by_length=True)
    assert [torch.equal(a.args[0], b.args[0]) for a, b in zip(plain, same, strict=True)] == [True, True, True]

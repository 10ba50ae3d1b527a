"""Calibration data as onnxruntime feeds of a fixed-shape graph (``export --precision int8`` without
``--dynamic-batch``): text batches padded to their own longest line fit the graph's sequence length."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nmcli.commands.export import graph_feeds
from nmcli.errors import InputError
from nmcli.inputs import parse_input_spec
from nmcli.models.data import Batch

SPEC = parse_input_spec("input_ids:1x8:int64,attention_mask:1x8:int64")


def test_token_batches_shorter_or_longer_than_the_graph_are_padded_or_cut() -> None:
    short = Batch(
        (), {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    )
    long = Batch((), {"input_ids": torch.arange(1, 11)[None], "attention_mask": torch.ones(1, 10, dtype=torch.long)})
    feeds = graph_feeds([short, long], SPEC, dynamic_batch=False, what="--calib text:x")
    assert len(feeds) == 3 and all(f["input_ids"].shape == (1, 8) for f in feeds)
    assert feeds[0]["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0, 0, 0]]
    assert feeds[1]["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0, 0, 0]]  # padding stays masked out
    assert feeds[2]["input_ids"].tolist() == [list(range(1, 9))]
    assert feeds[0]["input_ids"].dtype == np.int64


def test_float_inputs_must_fit_the_graph() -> None:
    spec = parse_input_spec("1x4")
    with pytest.raises(InputError, match="per example but the model is exported for"):
        graph_feeds([Batch((torch.zeros(2, 3),))], spec, dynamic_batch=False, what="--calib tensors:x")

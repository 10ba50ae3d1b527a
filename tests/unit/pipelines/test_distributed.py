"""FSDP2 helpers that need no process group: the group-split check and the sharded-state path."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from nmcli.algorithms.srste import SparseTraining
from nmcli.errors import InputError
from nmcli.formats.checkpoint import LayerEntry
from nmcli.pipelines.distributed import check_shardable, sharded_state_path


def _sparse(rows: int, axis: int) -> SparseTraining:
    model = nn.Sequential(nn.Linear(8, rows, bias=False))
    entry = LayerEntry("0.weight", "0", 2, 4, axis, (rows, 8))
    return SparseTraining(model, [entry])


def test_groups_along_the_input_axis_are_never_split() -> None:
    check_shardable(_sparse(6, axis=1), world=4)  # rows split anyhow: every group sits in one row


def test_groups_along_dim0_must_be_split_at_group_boundaries() -> None:
    check_shardable(_sparse(12, axis=0), world=3)  # chunks of 4 rows: whole 2:4 groups
    with pytest.raises(InputError, match=r"chunks of 6, not a multiple of M=4.*--shard ddp"):
        check_shardable(_sparse(12, axis=0), world=2)


def test_sharded_state_sits_beside_the_output() -> None:
    assert sharded_state_path(Path("runs/out.safetensors")) == Path("runs/out.dcp")

"""``finetune --shard fsdp --resume`` reads DCP state without running code from the files.

DCP's own reader unpickles ``.metadata`` and loads byte entries with ``weights_only=False``; an
edited ``OUT.dcp/`` must be refused before any of its code runs (the marker file is never written).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nmcli.pipelines.dcp_read import UnreadableStateError, UnsafeStateError, load_dcp, names_code

dcp = pytest.importorskip("torch.distributed.checkpoint")
state_dict = pytest.importorskip("torch.distributed.checkpoint.state_dict")


class _Marker:
    """Pickles to a call that writes a marker file: what an attacker's state would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def _trained(tmp_path: Path) -> tuple[nn.Module, torch.optim.Optimizer, Path]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    saved = tmp_path / "out.dcp"
    model_state, optim_state = state_dict.get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(saved))
    return model, opt, saved


def _fresh_state() -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    model_state, optim_state = state_dict.get_state_dict(model, opt)
    return model, opt, {"model": model_state, "optim": optim_state}


def test_real_state_round_trips(tmp_path: Path) -> None:
    trained, trained_opt, saved = _trained(tmp_path)
    model, opt, state = _fresh_state()
    load_dcp(state, saved)
    state_dict.set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for a, b in zip(model.parameters(), trained.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    got, want = opt.state_dict()["state"], trained_opt.state_dict()["state"]
    assert all(torch.equal(got[k]["exp_avg"], want[k]["exp_avg"]) for k in want)


def test_metadata_that_names_code_is_refused_before_it_runs(tmp_path: Path) -> None:
    _, _, saved = _trained(tmp_path)
    marker = tmp_path / "ran"
    (saved / ".metadata").write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(UnreadableStateError) as caught:
        load_dcp(_fresh_state()[2], saved)
    assert caught.value.names_code and "posix.system" in str(caught.value)
    assert not marker.exists()


def test_a_byte_entry_that_names_code_is_refused_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    saved = tmp_path / "evil.dcp"
    dcp.save({"w": torch.zeros(2), "extra": _Marker(marker)}, checkpoint_id=str(saved))
    assert not marker.exists()
    with pytest.raises(UnreadableStateError) as caught:
        load_dcp({"w": torch.ones(2), "extra": None}, saved)
    assert caught.value.names_code
    assert not marker.exists()


def test_a_missing_data_file_is_unreadable_not_code(tmp_path: Path) -> None:
    _, _, saved = _trained(tmp_path)
    for data in saved.glob("*.distcp"):
        data.unlink()
    with pytest.raises(UnreadableStateError) as caught:
        load_dcp(_fresh_state()[2], saved)
    assert not caught.value.names_code


def test_other_failures_are_not_called_code() -> None:
    assert not names_code(FileNotFoundError("no such file"))
    assert names_code(RuntimeError("wrapped")) is False
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = UnsafeStateError("its metadata names posix.system")
    assert names_code(wrapped)

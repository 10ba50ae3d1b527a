"""torchrun with 2 CPU processes (gloo) gives the same result as one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nmcli.commands.prune import run_prune
from nmcli.formats.open import load_checkpoint
from tests.conftest import py_source


def test_two_process_ddp_equals_single_process(tmp_path: Path) -> None:
    pruned = tmp_path / "mlp-2of4.safetensors"
    run_prune(py_source("tiny_mlp"), pattern="2:4", keep_dense=True, output=pruned)
    gen = torch.Generator().manual_seed(3)
    data = tmp_path / "d.safetensors"
    save_file(
        {"inputs": torch.randn(48, 64, generator=gen), "targets": torch.randint(0, 10, (48,), generator=gen)}, str(data)
    )
    common = [
        "finetune", str(pruned), "--data", f"tensors:{data}", "--steps", "5", "--batch-size", "16",
        "--grad-accum", "2", "--lr", "0.1", "--device", "cpu", "--save-every", "2", "--json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp_out, single_out = tmp_path / "ddp.safetensors", tmp_path / "single.safetensors"
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "nmcli", *common, "-o", str(ddp_out)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, "-m", "nmcli", *common, "-o", str(single_out)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    # only rank 0 reports and writes
    summaries = [json.loads(line) for line in ddp.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1
    assert summaries[0]["final_loss"] == pytest.approx(json.loads(single.stdout)["final_loss"], rel=1e-5)
    a, b = load_checkpoint(ddp_out), load_checkpoint(single_out)
    for name in a.tensors:
        torch.testing.assert_close(a.tensors[name], b.tensors[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name])
        torch.testing.assert_close(a.dense[name], b.dense[name], rtol=1e-5, atol=1e-6)

"""``finetune --shard fsdp`` on a sharded checkpoint directory (HF shards + sidecar), 2 CPU processes (gloo).

Each rank builds the model on the meta device and reads only its own rows of each weight from the
shards; rank 0 streams the result into a sharded directory in the input's layout. The output equals
the 1-process run's (masks identical, weights within 1e-5); Ctrl-C + ``--resume`` into a directory
output equals the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from nmcli.commands.prune import run_prune
from nmcli.formats.open import load_checkpoint
from nmcli.formats.sharded import INDEX, SIDECAR, is_sharded_checkpoint

transformers = pytest.importorskip("transformers", reason="transformers is not installed (hf extra)")

SEQ, VOCAB = 16, 128
_SHAPE = f"input_ids:1x{SEQ}:int64,attention_mask:1x{SEQ}:int64"
_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
_TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "nmcli"]


def _pruned_folder(root: Path) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "llama", max_shard_size="30KB")
    pruned = root / "llama-2of4"
    run_prune(f"hf:{root / 'llama'}", pattern="2:4", input_shape=_SHAPE, keep_dense=True, output=pruned)
    assert is_sharded_checkpoint(pruned) and (pruned / INDEX).is_file()
    return pruned


def _data(root: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    path = root / "ids.safetensors"
    ids = torch.randint(0, VOCAB, (32, SEQ), generator=gen)
    save_file({"input_ids": ids, "attention_mask": torch.ones(32, SEQ).long()}, str(path))
    return path


def _args(pruned: Path, data: Path, steps: int) -> list[str]:
    return [
        "finetune", str(pruned), "--data", f"tensors:{data}", "--teacher", "none", "--steps", str(steps),
        "--batch-size", "8", "--lr", "0.1", "--device", "cpu", "--eval-split", "0", "--json",
    ]  # fmt: skip


def _run(cmd: list[str]) -> dict[str, Any]:
    done = subprocess.run(cmd, capture_output=True, text=True, env=_ENV, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, done.stdout  # only rank 0 reports
    out: dict[str, Any] = summaries[0]
    return out


def _assert_same(a_path: Path, b_path: Path, atol: float) -> None:
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert set(a.masks) == set(b.masks) and a.masks and a.dense
    assert set(a.tensors) == set(b.tensors)
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]), name
        torch.testing.assert_close(a.dense[name], b.dense[name], rtol=0, atol=atol, msg=name)
    for name in a.tensors:
        torch.testing.assert_close(a.tensors[name], b.tensors[name], rtol=0, atol=atol, msg=name)


def test_fsdp_sharded_directory_in_and_out_equals_one_process(tmp_path: Path) -> None:
    pruned, data = _pruned_folder(tmp_path), _data(tmp_path)
    fsdp_out, single_out = tmp_path / "fsdp", tmp_path / "single"
    fsdp = _run([*_TORCHRUN, *_args(pruned, data, 3), "--shard", "fsdp", "-o", str(fsdp_out)])
    single = _run([sys.executable, "-m", "nmcli", *_args(pruned, data, 3), "-o", str(single_out)])
    assert fsdp["final_loss"] == pytest.approx(single["final_loss"], rel=1e-5)
    assert fsdp["sad_vs_start"] == single["sad_vs_start"] > 0
    for out in (fsdp_out, single_out):  # the input's layout: same shard files, index, config, sidecar
        assert is_sharded_checkpoint(out)
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in pruned.iterdir())
    assert (fsdp_out / INDEX).read_text() == (pruned / INDEX).read_text()
    _assert_same(fsdp_out, single_out, atol=1e-5)
    assert not (tmp_path / "fsdp.dcp").exists() and (fsdp_out / SIDECAR).is_file()
    history = load_checkpoint(fsdp_out).meta.history
    assert [record["command"] for record in history] == ["prune", "finetune"]


def _interrupted(cmd: list[str], after_step: int) -> None:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_ENV, start_new_session=True
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith(f"step {after_step}/"):
            os.killpg(proc.pid, signal.SIGINT)
            break
    out, _ = proc.communicate(timeout=300)
    summary = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert summary["interrupted"] and summary["steps"] < summary["total_steps"]


@pytest.mark.slow
def test_fsdp_sharded_directory_ctrl_c_then_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    pruned, data = _pruned_folder(tmp_path), _data(tmp_path)
    args = [*_args(pruned, data, 30), "--shard", "fsdp"]
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    _interrupted([*_TORCHRUN, *args, "--log-every", "1", "-o", str(resumed)], after_step=3)
    assert is_sharded_checkpoint(resumed) and (tmp_path / "resumed.dcp").is_dir()
    assert (tmp_path / "resumed.trainstate.pt").is_file()
    _run([*_TORCHRUN, *args, "--resume", "-o", str(resumed)])
    _run([*_TORCHRUN, *args, "-o", str(straight)])
    _assert_same(resumed, straight, atol=0.0)

"""``finetune --shard fsdp`` under torchrun with 2 CPU processes (gloo), on a tiny Llama and a tiny Mixtral.

FSDP2 shards every block and the root; the result equals the same run on 1 process with the same
global batch (masks identical, weights within 1e-5, SGD: AdamW's normalised steps amplify the
reduction-order noise of any data-parallel run, DDP included); Ctrl-C to the torchrun group stops
every rank at one step boundary and ``--resume`` continues bit-identically; the stored dense weights
round-trip into a second run. On a sharded checkpoint directory (HF shards + sidecar) each rank
reads only its own rows onto a meta-device skeleton and rank 0 streams a sharded directory out in
the input's layout, equal to the 1-process run.
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
from nmcli.nm.masks import apply_mask

transformers = pytest.importorskip("transformers", reason="transformers is not installed (hf extra)")

SEQ, VOCAB = 16, 128
_SHAPE = f"input_ids:1x{SEQ}:int64,attention_mask:1x{SEQ}:int64"
_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
_TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "nmcli"]


def _pruned(family: str, root: Path) -> Path:
    common = {
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    }  # fmt: skip
    config = (
        transformers.LlamaConfig(**common, tie_word_embeddings=False)
        if family == "llama"
        else transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / family)
    pruned = root / f"{family}-2of4.safetensors"
    run_prune(f"hf:{root / family}", pattern="2:4", input_shape=_SHAPE, keep_dense=True, output=pruned)
    return pruned


def _data(root: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    path = root / "ids.safetensors"
    save_file(
        {"input_ids": torch.randint(0, VOCAB, (32, SEQ), generator=gen), "attention_mask": torch.ones(32, SEQ).long()},
        str(path),
    )
    return path


def _args(pruned: Path, data: Path, steps: int) -> list[str]:
    return [
        "finetune", str(pruned), "--data", f"tensors:{data}", "--teacher", "none", "--steps", str(steps),
        "--batch-size", "8", "--lr", "0.1", "--device", "cpu", "--eval-split", "0", "--json",
    ]  # fmt: skip


def _run(cmd: list[str]) -> dict[str, Any]:
    done = subprocess.run(cmd, capture_output=True, text=True, env=_ENV, timeout=300, check=False)
    causes = [
        line for line in done.stderr.splitlines() if any(k in line for k in ("Error", "error", "what()", "abort"))
    ]
    assert done.returncode == 0, "\n".join([*causes[:20], done.stderr[-2000:]])
    summaries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, done.stdout  # only rank 0 reports
    out: dict[str, Any] = summaries[0]
    return out


def _assert_same(a_path: Path, b_path: Path, atol: float) -> None:
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert set(a.masks) == set(b.masks) and a.masks
    assert set(a.tensors) == set(b.tensors)
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]), name
        torch.testing.assert_close(a.dense[name], b.dense[name], rtol=0, atol=atol, msg=name)
    for name in a.tensors:
        torch.testing.assert_close(a.tensors[name], b.tensors[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_fsdp_two_processes_equal_one_and_dense_round_trips(family: str, tmp_path: Path) -> None:
    pruned, data = _pruned(family, tmp_path), _data(tmp_path)
    fsdp_out, single_out = tmp_path / "fsdp.safetensors", tmp_path / "single.safetensors"
    fsdp = _run([*_TORCHRUN, *_args(pruned, data, 3), "--shard", "fsdp", "-o", str(fsdp_out)])
    single = _run([sys.executable, "-m", "nmcli", *_args(pruned, data, 3), "-o", str(single_out)])
    assert fsdp["final_loss"] == pytest.approx(single["final_loss"], rel=1e-5)
    assert fsdp["sad_vs_start"] == single["sad_vs_start"]
    _assert_same(fsdp_out, single_out, atol=1e-5)
    assert not (tmp_path / "fsdp.dcp").exists()  # the resumable state goes with a finished run
    if family == "mixtral":
        return
    # --keep-dense round trip: the gathered dense weights give the effective ones and start a second run
    tuned = load_checkpoint(fsdp_out)
    for name, mask in tuned.masks.items():
        assert torch.equal(tuned.tensors[name], apply_mask(tuned.dense[name], mask))
    again = tmp_path / "again.safetensors"
    _run([*_TORCHRUN, *_args(fsdp_out, data, 1), "--shard", "fsdp", "--teacher", "auto", "-o", str(again)])
    assert load_checkpoint(again).dense


def _interrupted(cmd: list[str], after_step: int) -> None:
    """Run ``cmd`` in its own process group and send the group SIGINT (a terminal's Ctrl-C) after a step."""
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
def test_fsdp_ctrl_c_then_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    pruned, data = _pruned("llama", tmp_path), _data(tmp_path)
    args = [*_args(pruned, data, 30), "--shard", "fsdp"]
    resumed, straight = tmp_path / "resumed.safetensors", tmp_path / "straight.safetensors"
    _interrupted([*_TORCHRUN, *args, "--log-every", "1", "-o", str(resumed)], after_step=3)
    assert (tmp_path / "resumed.dcp").is_dir() and (tmp_path / "resumed.trainstate.pt").is_file()
    _run([*_TORCHRUN, *args, "--resume", "-o", str(resumed)])
    _run([*_TORCHRUN, *args, "-o", str(straight)])
    _assert_same(resumed, straight, atol=0.0)


def test_fsdp_bf16_checkpointing_with_a_sharded_teacher_keeps_fp32_master_weights(tmp_path: Path) -> None:
    pruned, data = _pruned("llama", tmp_path), _data(tmp_path)
    out = tmp_path / "bf16.safetensors"
    args = [*_args(pruned, data, 2), "--teacher", "auto", "--eval-split", "0.25", "--precision", "bf16"]
    summary = _run([*_TORCHRUN, *args, "--shard", "fsdp", "--activation-checkpointing", "-o", str(out)])
    assert summary["steps"] == 2 and {"before", "after"} <= set(summary["eval"])  # evaluated on the sharded model
    tuned = load_checkpoint(out)
    assert all(tensor.dtype == torch.float32 for tensor in tuned.dense.values())


def _pruned_folder(root: Path) -> Path:
    """A tiny Llama saved in 30 KB shards, pruned 2:4 to a sharded checkpoint directory (with dense weights)."""
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
    assert load_checkpoint(fsdp_out).dense
    assert not (tmp_path / "fsdp.dcp").exists() and (fsdp_out / SIDECAR).is_file()
    history = load_checkpoint(fsdp_out).meta.history
    assert [record["command"] for record in history] == ["prune", "finetune"]


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

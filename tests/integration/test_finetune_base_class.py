"""A sharded directory pruned with ``--model-class base`` from files saved with a head (issue 24).

``prune hf:DIR --model-class base -o OUT`` of a BERT sequence classifier keeps the files' names
(``bert.encoder...``, the ``classifier.*`` head left as it is) while the rebuilt base model has none of
the ``bert.`` prefix. ``finetune`` of such a directory trains the base model and writes the input's
layout under the input's names (the head copied unchanged); it equals the same run on the one-file
checkpoint of the same prune, which holds the model's own names; it resumes after Ctrl-C, runs under
``--shard fsdp`` with 2 processes, and its output exports, benchmarks, inspects and chains. A second
prune of the directory starts from its stored dense weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.commands.finetune import run_finetune
from nmcli.formats.open import load_checkpoint
from nmcli.formats.sharded import SIDECAR, is_sharded_checkpoint
from nmcli.formats.trainstate import trainstate_path
from nmcli.nm.masks import nm_mask
from nmcli.nm.pattern import Pattern
from nmcli.pipelines.training import FinetuneConfig, StepInfo
from tests.conftest import save_tiny_bert

pytest.importorskip("transformers", reason="transformers is not installed (hf extra)")

runner = CliRunner()
SEQ = 16
SHAPE = f"input_ids:1x{SEQ}:int64,attention_mask:1x{SEQ}:int64"
HEAD = {"classifier.weight", "classifier.bias"}


def invoke(*args: str) -> Any:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if "--json" in args else result


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dropout-free BERT classifier, its base model pruned to a directory and to one file, and token data."""
    root = tmp_path_factory.mktemp("base-class")
    folder = save_tiny_bert(
        root / "classifier", "BertForSequenceClassification", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    for out in ("base-dir", "base.safetensors"):
        invoke("prune", f"hf:{folder}", "--model-class", "base", "--keep-dense", "--input-shape", SHAPE,
               "-o", str(root / out))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    ids = {"input_ids": torch.randint(0, 64, (32, SEQ), generator=gen), "attention_mask": torch.ones(32, SEQ).long()}
    save_file(ids, str(root / "ids.safetensors"))
    return root


def _config(root: Path, steps: int = 3) -> FinetuneConfig:
    return FinetuneConfig(
        data=f"tensors:{root / 'ids.safetensors'}", teacher="auto", steps=steps, batch_size=8, lr=0.1,
        mask_interval=1, eval_split=0.0, device="cpu",
    )  # fmt: skip


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return sorted(handle.keys())


def test_finetune_keeps_the_input_names_and_equals_the_one_file_route(root: Path) -> None:
    base_dir, out_dir = root / "base-dir", root / "ft-dir"
    assert is_sharded_checkpoint(base_dir) and set(_keys(base_dir / "model.safetensors")) >= HEAD
    run_finetune(base_dir, _config(root), output=out_dir)
    run_finetune(root / "base.safetensors", _config(root), output=root / "ft.safetensors")

    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in base_dir.iterdir())
    assert _keys(out_dir / "model.safetensors") == _keys(base_dir / "model.safetensors")  # the input's names
    assert _keys(out_dir / SIDECAR) == _keys(base_dir / SIDECAR)  # masks and dense weights under bert.*
    before, after = load_file(str(base_dir / "model.safetensors")), load_file(str(out_dir / "model.safetensors"))
    for name in HEAD:  # the head the base model has no place for: copied as it is
        assert torch.equal(after[name], before[name])
    assert not torch.equal(
        after["bert.encoder.layer.0.output.dense.weight"], before["bert.encoder.layer.0.output.dense.weight"]
    )

    directory, one_file = load_checkpoint(out_dir), load_checkpoint(root / "ft.safetensors")
    assert {e.param for e in directory.meta.layers} == {"bert." + e.param for e in one_file.meta.layers}
    for name, value in one_file.tensors.items():  # the same training, whichever names the files hold
        torch.testing.assert_close(directory.tensors["bert." + name], value, rtol=0, atol=1e-6, msg=name)
    for name, mask in one_file.masks.items():
        assert torch.equal(directory.masks["bert." + name], mask), name
        torch.testing.assert_close(directory.dense["bert." + name], one_file.dense[name], rtol=0, atol=1e-6)
    assert [record["command"] for record in directory.meta.history] == ["prune", "finetune"]


def test_the_output_exports_benchmarks_inspects_and_chains(root: Path) -> None:
    out_dir = root / "chain-dir"
    run_finetune(root / "base-dir", _config(root, steps=2), output=out_dir)
    exported = invoke("export", str(out_dir), "--onnx", "-o", str(root / "chain.onnx"), "--json")
    assert exported["verified"] is True and len(exported["sparse_initializers"]) == 13 and not exported["lost_layers"]
    assert invoke("bench", str(out_dir), "--iters", "2", "--warmup", "1", "--json")["agreement_ok"] is True
    inspected = invoke("inspect", str(out_dir), "--rebuild", "--strict", "--json")
    assert all(layer["param"].startswith("bert.") for layer in inspected["layers"])
    assert invoke("sad", str(root / "base-dir"), str(out_dir), "--json")["total"] > 0
    again = root / "chain.safetensors"
    invoke("finetune", str(out_dir), "--data", f"tensors:{root / 'ids.safetensors'}", "--steps", "1",
           "--batch-size", "8", "--eval-split", "0", "-o", str(again))  # fmt: skip
    assert all(e.param.startswith("bert.") for e in load_checkpoint(again).meta.layers)  # the input's names
    assert invoke("export", str(again), "--onnx", "-o", str(root / "again.onnx"), "--json")["verified"] is True


def test_a_second_prune_starts_from_the_stored_dense_weights(root: Path) -> None:
    again = root / "again-1of4.safetensors"
    invoke("prune", str(root / "base-dir"), "-p", "1:4", "--keep-dense", "-o", str(again))
    start, pruned = load_checkpoint(root / "base-dir"), load_checkpoint(again)
    assert not any(name.startswith("bert.") for name in pruned.tensors)  # the model's names, no stray copies
    for entry in pruned.meta.layers:
        dense = start.dense["bert." + entry.param]
        torch.testing.assert_close(pruned.dense[entry.param], dense, rtol=0, atol=0)
        assert torch.equal(pruned.masks[entry.param], nm_mask(dense, Pattern(1, 4), 1)), entry.param


def test_ctrl_c_then_resume_equals_the_uninterrupted_run(root: Path) -> None:
    cfg = _config(root, steps=4)
    straight, halves = root / "straight-dir", root / "halves-dir"
    run_finetune(root / "base-dir", cfg, output=straight)

    def stop_at_2(info: StepInfo) -> None:
        if info.step == 2:
            raise KeyboardInterrupt  # what Ctrl-C does

    first = run_finetune(root / "base-dir", cfg, output=halves, on_step=stop_at_2)
    assert first.interrupted and trainstate_path(halves).is_file()
    assert _keys(halves / "model.safetensors") == _keys(root / "base-dir" / "model.safetensors")
    second = run_finetune(root / "base-dir", cfg, output=halves, resume=True)
    assert second.steps == 4 and not trainstate_path(halves).exists()
    a, b = load_checkpoint(straight), load_checkpoint(halves)
    for name in a.tensors:
        torch.testing.assert_close(a.tensors[name], b.tensors[name], rtol=0, atol=1e-7, msg=name)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)


def test_fsdp_two_processes_equal_one(root: Path) -> None:
    args = [
        "finetune", str(root / "base-dir"), "--data", f"tensors:{root / 'ids.safetensors'}", "--steps", "3",
        "--batch-size", "8", "--lr", "0.1", "--device", "cpu", "--eval-split", "0", "--json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "nmcli"]
    reports = []
    for cmd in ([*torchrun, *args, "--shard", "fsdp", "-o", str(root / "fsdp")], [sys.executable, "-m", "nmcli", *args, "-o", str(root / "one")]):  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        reports.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert reports[0]["final_loss"] == pytest.approx(reports[1]["final_loss"], rel=1e-5)
    assert _keys(root / "fsdp" / "model.safetensors") == _keys(root / "base-dir" / "model.safetensors")
    fsdp, one = load_checkpoint(root / "fsdp"), load_checkpoint(root / "one")
    for name in one.tensors:
        torch.testing.assert_close(fsdp.tensors[name], one.tensors[name], rtol=0, atol=1e-5, msg=name)
    assert all(torch.equal(fsdp.masks[n], one.masks[n]) for n in one.masks)

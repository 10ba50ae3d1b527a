"""Sharded checkpoints end to end: prune, inspect, sad, export and finetune of an HF directory in shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.formats.open import load_checkpoint
from nmcli.formats.sharded import INDEX, SIDECAR
from tests.conftest import save_tiny_bert

transformers = pytest.importorskip("transformers")


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def gpt2_shards(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 (Conv1D [in, out] weights, tied LM head) saved in 20 kB shards."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir))
    out = tmp_path_factory.mktemp("shards") / "gpt2-sharded"
    model.save_pretrained(out, max_shard_size="20KB")
    assert len(list(out.glob("model-*.safetensors"))) > 2
    return out


@pytest.fixture(scope="module")
def pruned(gpt2_shards: Path) -> Path:
    code, out, err = run("prune", f"hf:{gpt2_shards}", "--json")
    assert code == 0, err
    report = json.loads(out)
    target = gpt2_shards.parent / "gpt2-sharded-2of4"
    assert report["output"] == str(target)
    assert report["layers"] and all(layer["status"] == "pruned" for layer in report["layers"] if "h." in layer["name"])
    return target


def test_prune_writes_a_plain_hf_directory(gpt2_shards: Path, pruned: Path) -> None:
    shards = sorted(p.name for p in gpt2_shards.glob("model-*.safetensors"))
    assert sorted(p.name for p in pruned.glob("model-*.safetensors")) == shards
    assert (pruned / INDEX).is_file() and (pruned / SIDECAR).is_file() and (pruned / "config.json").is_file()
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(pruned), output_loading_info=True)
    assert not info["unexpected_keys"]
    weight = model.transformer.h[0].attn.c_attn.weight.detach()  # Conv1D [in, out]: groups along dim 0
    assert int(weight.t().reshape(weight.shape[1], -1, 4).ne(0).sum(-1).max()) <= 2


def test_same_masks_as_the_single_file_prune(tiny_gpt2_dir: Path, pruned: Path, tmp_path: Path) -> None:
    single = tmp_path / "single.safetensors"
    code, _, err = run("prune", f"hf:{tiny_gpt2_dir}", "-o", str(single))
    assert code == 0, err
    a, b = load_checkpoint(pruned), load_checkpoint(single)  # the single file also stores the tied lm_head
    assert sorted(a.masks) == sorted(b.masks)
    assert all(torch.equal(a.masks[k], b.masks[k]) and torch.equal(a.tensors[k], b.tensors[k]) for k in a.masks)
    code, out, err = run("sad", str(pruned), f"hf:{pruned}", "--json")
    assert code == 0, err
    assert json.loads(out)["sad"] == 0


def test_inspect_strict_reads_masks_only(pruned: Path) -> None:
    code, out, err = run("inspect", str(pruned), "--strict", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["compliant"] is True and report["eligible_layers"] == len(report["layers"]) > 0
    assert all(abs(layer["sparsity"] - 0.5) < 1e-9 for layer in report["layers"])
    code, out, _ = run("inspect", str(pruned), "-p", "1:4", "--strict", "--json")
    assert code == 1 and json.loads(out)["compliant"] is False


def test_existing_output_needs_force(gpt2_shards: Path, pruned: Path) -> None:
    code, out, _ = run("prune", f"hf:{gpt2_shards}", "-o", str(pruned), "--json")
    assert code == 2 and "--force" in json.loads(out)["error"]["message"]
    code, out, err = run("prune", str(gpt2_shards), "-o", str(pruned), "--force", "--json")
    assert code == 0, err
    code, out, _ = run("prune", f"hf:{gpt2_shards}", "-o", str(gpt2_shards), "--force", "--json")
    assert code == 2 and "input" in json.loads(out)["error"]["message"]


@pytest.mark.slow
def test_export_loads_it_whole(pruned: Path, tmp_path: Path) -> None:
    onnx_path = tmp_path / "gpt2.onnx"
    code, out, err = run(
        "export", str(pruned), "--onnx", "-o", str(onnx_path), "--input-shape", "input_ids:1x16:int64", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["verified"] is True


def test_a_buffer_older_files_store_is_kept_and_never_blocks_export_or_finetune(tmp_path: Path) -> None:
    """Files saved by older transformers hold BERT's ``embeddings.position_ids``, which today's class
    computes itself (a non-persistent buffer): a sharded checkpoint of them exports, fine-tunes into a
    directory, and keeps the stored tensor as it was (the real MiniLM folder is such a one)."""
    from safetensors.torch import load_file, save_file

    folder = save_tiny_bert(tmp_path / "bert")
    stored = load_file(str(folder / "model.safetensors"))
    stored["embeddings.position_ids"] = torch.arange(16).unsqueeze(0)
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shape = "input_ids:1x16:int64,attention_mask:1x16:int64"
    code, _, err = run("prune", f"hf:{folder}", "-o", str(tmp_path / "pruned"), "--input-shape", shape)
    assert code == 0, err
    code, _, err = run("export", str(tmp_path / "pruned"), "--onnx", "-o", str(tmp_path / "m.onnx"))
    assert code == 0, err
    save_file({"input_ids": torch.randint(0, 64, (8, 16)), "attention_mask": torch.ones(8, 16).long()},
              str(tmp_path / "ids.safetensors"))  # fmt: skip
    code, _, err = run("finetune", str(tmp_path / "pruned"), "--data", f"tensors:{tmp_path / 'ids.safetensors'}",
                       "--steps", "1", "--batch-size", "4", "--teacher", "auto", "--eval-split", "0")  # fmt: skip
    assert code == 0, err
    tuned = tmp_path / "pruned-ft"
    assert torch.equal(load_file(str(tuned / "model.safetensors"))["embeddings.position_ids"], torch.arange(16)[None])
    assert run("inspect", str(tuned), "--strict")[0] == 0

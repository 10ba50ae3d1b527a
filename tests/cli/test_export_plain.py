"""``nmcli export --format plain|hf`` (issue 23): the pruned weights for the next tool, with no nmcli records.

``plain`` is one safetensors state dict that ``load_state_dict(strict=True)`` takes; ``hf`` a plain
transformers folder (config and tokenizer copied, sharded weights, no sidecar) that
``AutoModel.from_pretrained`` loads. Both keep the pruned zeros exact.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from fixtures.models import tiny_mlp
from nmcli.cli.app import app
from nmcli.commands.export_plain import run_plain_export
from nmcli.formats.open import load_checkpoint
from tests.conftest import py_source


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_plain_state_dict_loads_strictly_with_exact_zeros(workdir: Path) -> None:
    code, _, err = run("prune", py_source("tiny_mlp"), "-p", "2:4", "-o", "m.safetensors")
    assert code == 0, err
    code, out, err = run("export", "m.safetensors", "--format", "plain", "-o", "plain.safetensors", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["format"] == "plain" and data["output"] == "plain.safetensors" and data["pruned_layers"] > 0
    state = load_file("plain.safetensors")
    assert not [k for k in state if k.startswith("__nmcli__")]
    with safe_open("plain.safetensors", "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
    model = tiny_mlp()
    model.load_state_dict(state, strict=True)
    ckpt = load_checkpoint(workdir / "m.safetensors")
    for name, value in ckpt.tensors.items():
        assert torch.equal(state[name], value)
        if name in ckpt.masks:
            assert torch.equal(state[name] == 0, ~ckpt.masks[name].bool())
            assert not torch.signbit(state[name][state[name] == 0]).any()  # +0.0, never -0.0
    code, _, err = run("export", "m.safetensors", "--format", "plain")  # default name beside the input
    assert code == 0 and (workdir / "m-plain.safetensors").is_file(), err


def test_plain_refuses_what_it_cannot_do(workdir: Path) -> None:
    code, _, err = run("prune", py_source("tiny_mlp"), "-p", "2:4", "-o", "m.safetensors")
    assert code == 0, err
    for args, words in [
        (["--format", "plain", "--trt"], "drop --trt"),
        (["--format", "plain", "-o", "x.onnx"], "ending in .safetensors"),
        (["--format", "tflite"], "choose onnx, plain or hf"),
        (["--format", "hf"], "--arch hf:DIR"),  # pruned from a py: source: no transformers folder to copy
    ]:
        code, _, err = run("export", "m.safetensors", *args)
        assert code == 2 and words in " ".join(err.split()), err
        assert len(err.strip().splitlines()) == 1, err


def test_hf_folder_loads_with_from_pretrained(workdir: Path, tiny_gpt2_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    source = workdir / "src"
    source.mkdir()
    for entry in tiny_gpt2_dir.iterdir():
        (source / entry.name).write_bytes(entry.read_bytes())
    (source / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    code, _, err = run("prune", f"hf:{source}", "-p", "2:4", "-o", "g.safetensors")
    assert code == 0, err
    code, _, err = run("export", "g.safetensors", "--format", "hf", "-o", "out")
    assert code == 0, err
    files = sorted(p.name for p in (workdir / "out").iterdir())
    assert "config.json" in files and "tokenizer_config.json" in files and "model.safetensors" in files
    assert "nmcli.safetensors" not in files
    ckpt = load_checkpoint(workdir / "g.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "out")
    state = model.state_dict()
    for name in ckpt.masks:
        assert torch.equal(state[name], ckpt.tensors[name]), name
    # sharded as transformers shards, with its index
    result = run_plain_export("g.safetensors", fmt="hf", output="sharded", max_shard_bytes=20_000)
    files = sorted(p.name for p in (workdir / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-000")]) > 1
    assert result.files == files
    again = transformers.AutoModelForCausalLM.from_pretrained(workdir / "sharded").state_dict()
    assert all(torch.equal(again[k], v) for k, v in state.items())


def test_hf_folder_from_a_sharded_checkpoint_has_no_sidecar(workdir: Path, tiny_gpt2_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    code, _, err = run("prune", f"hf:{tiny_gpt2_dir}", "-p", "2:4", "-o", "gpt2-2of4")
    assert code == 0, err
    assert (workdir / "gpt2-2of4" / "nmcli.safetensors").is_file()
    code, out, err = run("export", "gpt2-2of4", "--format", "hf", "--json")
    assert code == 0, err
    assert json.loads(out)["output"] == "gpt2-2of4-hf"
    files = sorted(p.name for p in (workdir / "gpt2-2of4-hf").iterdir())
    assert "nmcli.safetensors" not in files and "config.json" in files
    ckpt = load_checkpoint(workdir / "gpt2-2of4")
    state = transformers.AutoModelForCausalLM.from_pretrained(workdir / "gpt2-2of4-hf").state_dict()
    assert ckpt.masks and all(torch.equal(state[name], ckpt.tensors[name]) for name in ckpt.masks)


def test_hf_folder_is_never_chosen_by_an_edited_checkpoint(workdir: Path, tiny_gpt2_dir: Path) -> None:
    """A checkpoint whose recorded source was edited to name another folder copies nothing from it."""
    from nmcli.formats.checkpoint import save_checkpoint

    pytest.importorskip("transformers")
    source = workdir / "src"
    source.mkdir()
    for entry in tiny_gpt2_dir.iterdir():
        (source / entry.name).write_bytes(entry.read_bytes())
    secret = workdir / "secret"
    secret.mkdir()
    (secret / "config.json").write_text("{}\n")
    (secret / "private.txt").write_text("not for the output\n")
    code, _, err = run("prune", f"hf:{source}", "-p", "2:4", "-o", "g.safetensors")
    assert code == 0, err
    ckpt = load_checkpoint(workdir / "g.safetensors")
    ckpt.meta.source = replace(ckpt.meta.source, spec=f"hf:{secret}")  # what an edited checkpoint could claim
    save_checkpoint(ckpt, workdir / "edited.safetensors")
    code, _, err = run("export", "edited.safetensors", "--format", "hf", "-o", "out")
    assert code == 2 and "--arch hf:DIR" in " ".join(err.split()), err
    assert not (workdir / "out").exists()
    code, _, err = run("export", "edited.safetensors", "--format", "hf", "-o", "out", "--arch", f"hf:{source}")
    assert code == 0 and not (workdir / "out" / "private.txt").exists(), err

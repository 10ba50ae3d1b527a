"""Every LLM family users prune, as a new user would: a tiny random model built from its transformers
config, ``save_pretrained``, then the whole chain through the CLI:

prune -> inspect --strict (checkpoint) -> finetune 2 steps (``--teacher none`` on ``input_ids``
tensors) -> sad -> export (verified in onnxruntime) -> inspect --strict (ONNX).

Checked on the way: MoE expert stacks pruned along their last (input) dim, routers dense, tied LM
heads dense (in the checkpoint and in the ONNX, which keeps one copy of the tied table), and the
ONNX gate passing. The MoE and tied families run by default; the dense untied ones are ``slow``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.formats.onnx_layout import SPARSE_LAYERS_KEY, find_weights, gather_tables, load_onnx
from nmcli.formats.open import load_checkpoint
from nmcli.nm.masks import is_compliant
from nmcli.nm.pattern import Pattern

transformers = pytest.importorskip("transformers", reason="transformers is not installed (hf extra)")

runner = CliRunner()
VOCAB = 256
SEQ = 16
_LLAMA_LIKE = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _llama(tied: bool) -> Any:
    return transformers.LlamaConfig(**_LLAMA_LIKE, tie_word_embeddings=tied)


FAMILIES: dict[str, Callable[[], Any]] = {
    "mixtral": lambda: transformers.MixtralConfig(**_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **_LLAMA_LIKE,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    "llama_tied": lambda: _llama(True),
    "gpt2": lambda: transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64),
    "llama_untied": lambda: _llama(False),
    "qwen2": lambda: transformers.Qwen2Config(**_LLAMA_LIKE, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**_LLAMA_LIKE),
    "phi3": lambda: transformers.Phi3Config(**_LLAMA_LIKE, pad_token_id=0),
}
DEFAULT = ("mixtral", "qwen2_moe", "llama_tied", "gpt2")
PARAMS = [f if f in DEFAULT else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]


def _json(args: list[str], code: int = 0) -> dict[str, Any]:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == code, result.output
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def _build(family: str, root: Path) -> tuple[Path, Any]:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]())
    path = root / family
    model.save_pretrained(path)
    return path, model


def _tied(model: Any) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("family", PARAMS)
def test_family_prune_inspect_finetune_sad_export(family: str, tmp_path: Path) -> None:
    src, model = _build(family, tmp_path)
    routers = {
        f"{name}.weight" for name, module in model.named_modules() if name.endswith(("mlp.gate", "shared_expert_gate"))
    }
    experts = {name: p.dim() for name, p in model.named_parameters() if p.dim() >= 3}
    pruned, tuned, onnx = tmp_path / "p.safetensors", tmp_path / "ft.safetensors", tmp_path / "ft.onnx"
    spec = f"input_ids:1x{SEQ}:int64,attention_mask:1x{SEQ}:int64"

    report = _json(["prune", f"hf:{src}", "--input-shape", spec, "-o", str(pruned)])
    by_param = {layer["param"]: layer for layer in report["layers"]}
    for name in routers:
        assert by_param[name]["status"] == "skipped" and by_param[name]["reason"] == "router"
    ckpt = load_checkpoint(pruned)
    entries = {e.param: e for e in ckpt.meta.layers}
    assert set(experts) <= set(entries), "every expert stack is pruned"
    for name, ndim in experts.items():
        assert entries[name].axis == ndim - 1
        assert is_compliant(ckpt.tensors[name], Pattern(2, 4), ndim - 1)
        assert ckpt.masks[name].sum() * 2 == ckpt.masks[name].numel()
    assert not routers & set(entries)
    head = "lm_head.weight"
    if _tied(model):
        assert head not in entries and by_param[head]["reason"] == "weight is tied to an embedding"
    else:
        assert head in entries

    checked = _json(["inspect", str(pruned), "--strict"])
    eligible = {layer["param"] for layer in checked["layers"] if layer["eligible"]}
    assert checked["compliant"] and eligible == set(entries)

    data = tmp_path / "ids.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file(
        {"input_ids": torch.randint(0, VOCAB, (8, SEQ), generator=gen), "attention_mask": torch.ones(8, SEQ).long()},
        str(data),
    )
    finetune = ["finetune", str(pruned), "--data", f"tensors:{data}", "--teacher", "none", "--steps", "2"]
    tune = _json([*finetune, "--batch-size", "4", "--lr", "1e-2", "-o", str(tuned)])
    assert tune["steps"] == 2 and torch.isfinite(torch.tensor(tune["final_loss"]))

    sad = _json(["sad", str(pruned), str(tuned)])
    assert {layer["param"] for layer in sad["layers"]} == set(entries)  # expert masks counted
    assert sad["total"] == sum(ckpt.masks[name].numel() for name in entries)
    assert sad["sad"] == tune["sad_vs_start"]

    exported = _json(["export", str(tuned), "-o", str(onnx)])
    assert exported["verified"] is True and exported["lost_layers"] == []
    located = {m["param"].split("[", 1)[0] for m in exported["sparse_initializers"]}
    assert located == set(entries)
    for name in experts:  # one initializer per expert
        count = sum(1 for m in exported["sparse_initializers"] if m["param"].startswith(f"{name}["))
        assert count == model.get_parameter(name).shape[0]

    gate = _json(["inspect", str(onnx), "--strict"])
    assert gate["compliant"]
    proto = load_onnx(onnx)
    assert any(p.key == SPARSE_LAYERS_KEY for p in proto.metadata_props)
    tables = gather_tables(proto)
    assert len(tables) >= 1
    if _tied(model):
        # One copy of the tied table, read through a Transpose by the head's MatMul: not eligible.
        assert sum(1 for i in proto.graph.initializer if VOCAB in i.dims and 32 in i.dims) == 1
        head_inits = {w.name for w in find_weights(proto)} & tables
        assert head_inits and all(not layer["eligible"] for layer in gate["layers"] if layer["param"] in head_inits)


def test_onnx_without_metadata_treats_a_gather_table_as_not_eligible(tmp_path: Path) -> None:
    """A foreign ONNX (no nmcli metadata) of a tied model: the head's table is an embedding, not a layer."""
    src, _ = _build("llama_tied", tmp_path)
    pruned, onnx = tmp_path / "p.safetensors", tmp_path / "p.onnx"
    spec = f"input_ids:1x{SEQ}:int64,attention_mask:1x{SEQ}:int64"
    _json(["prune", f"hf:{src}", "--input-shape", spec, "-o", str(pruned)])
    _json(["export", str(pruned), "-o", str(onnx), "--no-verify"])
    proto = load_onnx(onnx)
    kept = [p for p in proto.metadata_props if p.key != SPARSE_LAYERS_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    import onnx as onnx_lib

    foreign = tmp_path / "foreign.onnx"
    onnx_lib.save_model(proto, str(foreign))
    gate = _json(["inspect", str(foreign), "--strict"])
    assert gate["compliant"]
    table = next(iter(gather_tables(proto)))
    row = next(layer for layer in gate["layers"] if layer["param"] == table)
    assert not row["eligible"] and "Gather" in row["reason"]


@pytest.mark.slow
def test_moe_fp16_export_keeps_every_expert_sparse(tmp_path: Path) -> None:
    """fp16 goes through the dynamo exporter, which may keep a stack whole and Gather each expert."""
    src, _ = _build("mixtral", tmp_path)
    pruned, onnx = tmp_path / "p.safetensors", tmp_path / "p16.onnx"
    spec = f"input_ids:1x{SEQ}:int64,attention_mask:1x{SEQ}:int64"
    _json(["prune", f"hf:{src}", "--input-shape", spec, "-o", str(pruned)])
    exported = _json(["export", str(pruned), "--precision", "fp16", "-o", str(onnx)])
    assert exported["verified"] is True and exported["lost_layers"] == []
    assert _json(["inspect", str(onnx), "--strict"])["compliant"]

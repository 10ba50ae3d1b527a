"""Meta-device loading (``finetune --shard fsdp``): a skeleton filled from the files equals the eager model.

Every parameter and buffer is filled (``to_empty`` memory is poisoned with NaN first, so anything left
unfilled shows), rotary ``inv_freq`` included (not in the files: computed by the constructor), from a
single nmcli/1 file and from a sharded checkpoint directory alike; the SR-STE masks are the stored ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nmcli.algorithms.srste import SparseTraining
from nmcli.commands.prune import run_prune
from nmcli.formats.open import load_checkpoint
from nmcli.models.sources import model_from_checkpoint
from nmcli.pipelines.materialize import TensorRows, fill_from_files, meta_model, read_stored, real_buffers, stored_name

transformers = pytest.importorskip("transformers", reason="transformers is not installed (hf extra)")

_SHAPE = "input_ids:1x8:int64,attention_mask:1x8:int64"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("meta")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "llama", max_shard_size="20KB")
    file, folder = root / "llama-2of4.safetensors", root / "llama-2of4"
    run_prune(f"hf:{root / 'llama'}", pattern="2:4", input_shape=_SHAPE, keep_dense=True, output=file)
    run_prune(f"hf:{root / 'llama'}", pattern="2:4", input_shape=_SHAPE, keep_dense=True, output=folder)
    return {"file": file, "folder": folder}


def test_stored_name_strips_parametrize() -> None:
    assert (
        stored_name("model.layers.0.mlp.up_proj.parametrizations.weight.original")
        == "model.layers.0.mlp.up_proj.weight"
    )
    assert stored_name("parametrizations.weight.original") == "weight"
    assert stored_name("model.norm.weight") == "model.norm.weight"


@pytest.mark.parametrize("form", ["file", "folder"])
def test_meta_materialization_fills_everything_like_the_eager_model(pruned: dict[str, Path], form: str) -> None:
    path = pruned[form]
    stored = read_stored(path)
    assert stored is not None and stored.dense_names
    eager = model_from_checkpoint(load_checkpoint(path), weights="dense")
    model = meta_model(stored.header.meta, arch=None, trust=False)
    assert all(p.device.type == "meta" for p in model.parameters())
    SparseTraining(model, stored.header.meta.layers, stored.header.masks, refine_in_backward=False)
    computed = {name: b.detach().clone() for name, b in real_buffers(model).items()}
    assert any(name.endswith("inv_freq") for name in computed)  # computed by the constructor, not in the files
    model.to_empty(device=torch.device("cpu"))
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:  # poison: anything left unfilled shows
            tensor.fill_(float("nan") if tensor.is_floating_point() else 1)
    fill_from_files(model, TensorRows(path), computed, stored.header.masks, str(path))
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    reference = dict(eager.named_parameters()) | dict(eager.named_buffers())
    for name, value in state.items():
        if ".parametrizations." in name and name.endswith(".mask"):
            param = stored_name(name.rsplit(".", 2)[0] + ".original")
            assert torch.equal(value, stored.header.masks[param]), name
            continue
        assert torch.equal(value, reference[stored_name(name)]), name
    assert {stored_name(n) for n in state if not n.endswith(".mask")} == set(reference)

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
    SparseTraining(model, stored.header.meta.layers, stored.masks, refine_in_backward=False)
    computed = {name: b.detach().clone() for name, b in real_buffers(model).items()}
    assert any(name.endswith("inv_freq") for name in computed)  # computed by the constructor, not in the files
    model.to_empty(device=torch.device("cpu"))
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:  # poison: anything left unfilled shows
            tensor.fill_(float("nan") if tensor.is_floating_point() else 1)
    fill_from_files(model, TensorRows(path), computed, stored.masks, str(path))
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    reference = dict(eager.named_parameters()) | dict(eager.named_buffers())
    for name, value in state.items():
        if ".parametrizations." in name and name.endswith(".mask"):
            param = stored_name(name.rsplit(".", 2)[0] + ".original")
            assert torch.equal(value, stored.masks[param]), name
            continue
        assert torch.equal(value, reference[stored_name(name)]), name
    assert {stored_name(n) for n in state if not n.endswith(".mask")} == set(reference)


def _sharded_worker(rank: int, store: str, path: str, results: str) -> None:
    import torch.distributed as dist

    from nmcli.pipelines.distributed import shard_model
    from nmcli.pipelines.materialize import materialize

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        stored = read_stored(path)
        assert stored is not None
        model = meta_model(stored.header.meta, arch=None, trust=False)
        sparse = SparseTraining(model, stored.header.meta.layers, stored.masks, refine_in_backward=False)
        shard_model(model, sparse, None, bf16=False, checkpointing=False)
        materialize(model, TensorRows(Path(path)), stored.masks, torch.device("cpu"), path)
        dense, state = sparse.dense_weights(keep=rank == 0), sparse.state_dict(keep=rank == 0)
        dist.barrier()
        torch.save({"dense": dense, "state": state, "masks": sparse.masks()}, f"{results}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_read_their_own_rows_into_fsdp_shards(pruned: dict[str, Path], tmp_path: Path) -> None:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    import tempfile

    import torch.multiprocessing as mp

    path = pruned["folder"]
    with tempfile.NamedTemporaryFile(dir=tmp_path, delete=False) as store:
        pass
    mp.spawn(_sharded_worker, args=(store.name, str(path), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    ckpt = load_checkpoint(path)
    assert rank1["state"] == {} and set(rank0["state"]) == set(ckpt.tensors)
    for name, value in ckpt.tensors.items():
        assert torch.equal(rank0["state"][name], value), name
    for name, value in ckpt.dense.items():
        assert torch.equal(rank0["dense"][name], value), name
        assert torch.equal(rank0["masks"][name], ckpt.masks[name]) and torch.equal(
            rank1["masks"][name], ckpt.masks[name]
        )


def test_tied_head_stays_tied_after_materialization(tmp_path: Path) -> None:
    from nmcli.pipelines.materialize import materialize

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied")
    path = tmp_path / "tied-2of4"
    run_prune(f"hf:{tmp_path / 'tied'}", pattern="2:4", input_shape=_SHAPE, output=path)
    stored = read_stored(path)
    assert stored is not None
    model = meta_model(stored.header.meta, arch=None, trust=False)
    SparseTraining(model, stored.header.meta.layers, stored.masks)
    materialize(model, TensorRows(path), stored.masks, torch.device("cpu"), str(path))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # to_empty alone unties them
    eager = model_from_checkpoint(load_checkpoint(path), weights="dense")
    assert torch.equal(model.lm_head.weight, eager.lm_head.weight)

"""Training checkpoints (``nmcli.formats.torchfiles``): wrappers, prefixes, refusal to unpickle, inference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from nmcli.errors import SourceError, TrustRequiredError
from nmcli.formats.torchfiles import find_state_dict, load_training_state, strip_wrapper_prefixes
from nmcli.models.inferred import infer_state_dict_layers, is_bare_state_dict, tied_to_embeddings
from nmcli.models.sources import build_model
from nmcli.nm.masks import apply_mask, nm_mask
from nmcli.nm.pattern import Pattern


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)).state_dict()


@pytest.mark.parametrize(
    ("wrap", "where"),
    [
        (lambda s: s, ""),
        (lambda s: {"epoch": 1, "state_dict": s, "optimizer": {"state": {}, "param_groups": []}}, "state_dict"),
        (lambda s: {"model": s, "step": 3}, "model"),
        (lambda s: {"module": s}, "module"),
        (lambda s: {"model_state_dict": s, "optimizer_state_dict": {}}, "model_state_dict"),
        (lambda s: {"model": {"module": s}}, "model/module"),
        (lambda s: {"model": {**s, "n_averaged": 3}}, "model"),  # a non-tensor entry beside the weights
    ],
)
def test_find_state_dict_in_wrappers(wrap, where) -> None:  # type: ignore[no-untyped-def]
    state = _state()
    found, key = find_state_dict(wrap(state))
    assert key == where and list(found) == list(state)


def test_find_state_dict_ema_only_when_asked() -> None:
    state = _state()
    ema = {k: v + 1 for k, v in state.items()}
    obj = {"state_dict": state, "state_dict_ema": ema}
    assert find_state_dict(obj)[0]["0.weight"] is state["0.weight"]
    assert find_state_dict(obj, "state_dict_ema")[0]["0.weight"] is ema["0.weight"]
    with pytest.raises(SourceError, match=r"no entry 'ema' \(--key\): it holds entries state_dict, state_dict_ema"):
        find_state_dict(obj, "ema")
    with pytest.raises(SourceError, match=r"no state dict \(its EMA weights: --key ema\)"):
        find_state_dict({"ema": state, "epoch": 2})


def test_strip_prefixes_shared_by_every_key() -> None:
    state = {"module._orig_mod.a.weight": torch.ones(1), "module._orig_mod.b.weight": torch.ones(1)}
    stripped, prefixes = strip_wrapper_prefixes(state)
    assert list(stripped) == ["a.weight", "b.weight"] and prefixes == ["module.", "_orig_mod."]
    mixed = {"module.a.weight": torch.ones(1), "b.weight": torch.ones(1)}
    assert strip_wrapper_prefixes(mixed) == (mixed, [])


def test_load_training_state(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "ckpt.pth.tar"
    torch.save({"epoch": 4, "arch": "mlp", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = load_training_state(path)
    assert (
        list(loaded.tensors) == list(state) and loaded.stripped == ["module."] and loaded.ignored == ["epoch", "arch"]
    )
    assert torch.equal(loaded.tensors["2.weight"], state["2.weight"])
    assert is_bare_state_dict(path)


def test_pickled_objects_are_refused_without_trust(tmp_path: Path) -> None:
    import argparse

    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": _state(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(TrustRequiredError, match=r"argparse\.Namespace.*nothing was unpickled.*--trust"):
        load_training_state(path)
    assert list(load_training_state(path, trust=True).tensors) == list(_state())


def test_not_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "random.pt"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(SourceError, match="not a torch checkpoint") as info:
        load_training_state(path)
    assert "weights_only" not in str(info.value)
    with pytest.raises(SourceError, match="is a directory"):
        load_training_state(tmp_path)


def test_tied_weights(tmp_path: Path) -> None:
    emb = nn.Embedding(16, 8)
    head = nn.Linear(8, 16, bias=False)
    head.weight = emb.weight
    state = {"embed.weight": emb.weight.data, "lm_head.weight": head.weight.data, "fc.weight": torch.ones(8, 8)}
    assert tied_to_embeddings(state) == ["lm_head.weight"]


def test_infer_state_dict_layers_pattern_from_zeros(tmp_path: Path) -> None:
    state = _state()
    for name in ("0.weight", "2.weight"):
        state[name] = apply_mask(state[name], nm_mask(state[name], Pattern(1, 4), 1))
    path = tmp_path / "eff.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert is_bare_state_dict(path)
    inferred = infer_state_dict_layers(path)
    assert (inferred.pattern, inferred.pattern_from) == (Pattern(1, 4), "inferred")
    assert [c.param for c in inferred.layers] == ["0.weight", "2.weight"]
    assert any("1:4 inferred" in n for n in inferred.notes)
    dense = infer_state_dict_layers(path, pattern="2:8")
    assert (dense.pattern, dense.pattern_from) == (Pattern(2, 8), "option")
    assert [c.param for c in dense.layers] == ["0.weight", "2.weight"]


def test_exported_program_saved_as_pt_is_a_model(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    path = tmp_path / "model.pt"
    torch.export.save(torch.export.export(model, (torch.randn(2, 8),)), str(path))
    assert not is_bare_state_dict(path)
    module, kind = build_model(str(path))
    assert kind == "exported"
    x = torch.randn(2, 8)
    assert torch.allclose(module(x), model(x))
    with pytest.raises(SourceError, match="model archive"):
        load_training_state(path)

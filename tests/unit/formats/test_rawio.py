"""The streamed magnitude prune's I/O parts (nmcli.formats.rawio, nmcli.formats.sharded): the O_DIRECT writer, the hashing reader,
and a prune with tiny slices and buffers that equals the default one byte for byte."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
import torch

import nmcli.formats.rawio as rawio
from nmcli.commands.prune import run_prune
from nmcli.formats.open import load_checkpoint
from nmcli.formats.safetensors import read_header, sha256_file
from nmcli.formats.sharded import SidecarWriter
from nmcli.nm.bits import exactly_n
from nmcli.nm.masks import nm_mask
from nmcli.nm.pattern import Pattern

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("direct", [True, False])
def test_sequential_file_holds_exactly_the_bytes_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    monkeypatch.setattr(rawio, "STAGE_BYTES", 3 * 4096)
    if not direct:  # a platform without O_DIRECT: buffered writes
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    rng = random.Random(0)
    path = tmp_path / "out.bin"
    expected = bytearray()
    writer = rawio.SequentialFile(path)
    try:
        for _ in range(60):
            size = rng.choice([1, 7, 100, 4096, 5000, 3 * 4096, 3 * 4096 + 1])
            data = bytes(rng.getrandbits(8) for _ in range(size))
            staged = writer.reserve(size, 2) if rng.random() < 0.5 else None
            if staged is not None:
                staged[:] = data
                writer.commit(size)
            else:
                writer.write(data)
            expected += data
        writer.finish()
    finally:
        writer.close()
    assert path.read_bytes() == bytes(expected)
    assert writer.size == len(expected)
    assert writer.direct is (direct and hasattr(os, "O_DIRECT"))


def test_reserve_refuses_misaligned_or_overflowing_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rawio, "STAGE_BYTES", 4096)
    writer = rawio.SequentialFile(tmp_path / "x.bin")
    try:
        writer.write(b"abc")
        assert writer.reserve(4, 2) is None  # position 3 is not 2-aligned
        assert writer.reserve(4, 1) is not None
        assert writer.reserve(4094, 1) is None  # does not fit in the buffer
    finally:
        writer.close()


@pytest.mark.parametrize("size", [0, 999, 1000, 4000, 10_007])
def test_shard_stream_gives_the_bytes_in_order_and_the_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    monkeypatch.setattr(rawio, "STREAM_PIECE", 1000)
    monkeypatch.setattr(rawio, "STREAM_RING", 2)
    path = tmp_path / "blob"
    data = os.urandom(size)
    path.write_bytes(data)
    stream = rawio.ShardStream(path)
    rng = random.Random(size)
    got = bytearray()
    while len(got) < size // 2:  # ranges within a piece, straddling pieces, larger than a piece
        step = min(rng.choice([1, 7, 500, 999, 1000, 2500]), size // 2 - len(got))
        got += stream.take(step)
    stream.skip(size - size // 2 - 3 if size > 10 else 0)
    assert bytes(got) == data[: size // 2]
    assert stream.hexdigest() == hashlib.sha256(data).hexdigest() == sha256_file(path)


def test_shard_stream_past_the_end_is_a_truncation_and_cancel_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nmcli.errors import CheckpointError

    monkeypatch.setattr(rawio, "STREAM_PIECE", 100)
    monkeypatch.setattr(rawio, "STREAM_RING", 2)
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 250)
    stream = rawio.ShardStream(path)
    with pytest.raises(CheckpointError, match="truncated"):
        stream.take(300)
    stream.cancel()
    waiting = rawio.ShardStream(path)  # its reader blocked on a full ring: cancel still returns
    waiting.take(10)
    waiting.cancel()


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # ties in magnitude: bf16 rounding of a coarse grid
        for p in model.parameters():
            p.copy_((p * 50).round() / 50)
    folder = tmp_path_factory.mktemp("llama") / "tiny-llama"
    model.save_pretrained(folder, max_shard_size="60KB")
    return folder


def test_streaming_with_tiny_slices_and_buffers_changes_nothing(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = tmp_path / "reference"
    run_prune(str(tiny_llama_dir), output=reference, keep_dense=True)
    monkeypatch.setattr(rawio, "STAGE_BYTES", 4096)  # tensors straddle staging buffers
    monkeypatch.setattr(rawio, "STREAM_GROUPS", 6)  # slices of 24 weights split rows
    monkeypatch.setattr(rawio, "STREAM_PIECE", 999)  # odd pieces: slices straddle them
    monkeypatch.setattr(rawio, "STREAM_RING", 2)
    small = tmp_path / "small"
    run_prune(str(tiny_llama_dir), output=small, keep_dense=True)
    shards = sorted(p.name for p in tiny_llama_dir.glob("model-*.safetensors"))
    assert len(shards) > 2
    for name in shards:
        assert (small / name).read_bytes() == (reference / name).read_bytes(), name
    ckpt = load_checkpoint(small)
    meta = ckpt.meta
    assert dict(meta.source.shards) == {name: sha256_file(tiny_llama_dir / name) for name in shards}
    from safetensors.torch import load_file

    source = {k: v for name in shards for k, v in load_file(str(tiny_llama_dir / name)).items()}
    for entry in meta.layers:  # the N:M rule, checked against the dense weights kept beside
        dense = ckpt.dense[entry.param]
        assert torch.equal(dense, source[entry.param]), entry.param  # streamed into the sidecar intact
        assert torch.equal(ckpt.masks[entry.param], nm_mask(dense, Pattern(2, 4), entry.axis)), entry.param
        assert not bool(torch.signbit(ckpt.tensors[entry.param][~ckpt.masks[entry.param]]).any())


def test_truncated_shard_is_a_checkpoint_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    from nmcli.errors import CheckpointError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    last = sorted(broken.glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        run_prune(str(broken), output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.tmp-*"))


@pytest.mark.parametrize("reserve", [0, 64, 1 << 16])
def test_sidecar_writer_header_in_place_or_spilled(tmp_path: Path, reserve: int) -> None:
    from safetensors import safe_open

    tensors = {f"t{i}": torch.arange(i * 10, dtype=torch.float32).reshape(-1, 2) for i in range(1, 5)}
    tensors["bf"] = torch.tensor([1.5, -0.0], dtype=torch.bfloat16)
    path = tmp_path / f"side-{reserve}.safetensors"
    writer = SidecarWriter(path, reserve=reserve)
    try:
        for name, value in tensors.items():
            writer.add(name, value)
        writer.finish({"format": "x", "long": "y" * 300})
    finally:
        writer.close()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no spill file left behind
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata() == {"format": "x", "long": "y" * 300}
        assert sorted(fh.keys()) == sorted(tensors)
        for name, value in tensors.items():
            assert torch.equal(fh.get_tensor(name), value), name
    assert read_header(path).metadata["format"] == "x"


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 2), (2, 8), (3, 8), (1, 3)])
def test_exactly_n_check_of_packed_masks(n: int, m: int) -> None:
    from nmcli.nm.bits import pack_mask

    w = torch.randn(16, 48, generator=torch.Generator().manual_seed(n * m))
    for axis in (0, 1):
        if w.shape[axis] % m:
            continue
        mask = nm_mask(w, Pattern(n, m), axis)
        assert exactly_n(pack_mask(mask).numpy(), tuple(w.shape), axis, n, m)
        fewer = mask.clone()
        fewer[mask.nonzero()[0].tolist()] = False  # one group keeps n - 1: compliant, but not exact
        assert not exactly_n(pack_mask(fewer).numpy(), tuple(w.shape), axis, n, m)
        more = mask.clone()
        more[(~mask).nonzero()[0].tolist()] = True
        assert not exactly_n(pack_mask(more).numpy(), tuple(w.shape), axis, n, m)

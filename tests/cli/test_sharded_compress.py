"""``nmcli export DIR --compress`` of a sharded checkpoint: compressed shards, read back bit-exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.formats.checkpoint import COMPRESSED_FORMAT, DENSE_PREFIX, MASK_PREFIX
from nmcli.formats.open import load_checkpoint, read_meta
from nmcli.formats.safetensors import read_header
from nmcli.formats.sharded import INDEX, SIDECAR
from nmcli.formats.sharded_checkpoint import ShardedCheckpointReader
from nmcli.formats.sharded_compress import compress_directory, directory_bytes
from nmcli.models.sources import load_model
from nmcli.nm.bits import pack_mask
from nmcli.nm.codec import INDICES_PREFIX, VALUES_PREFIX

transformers = pytest.importorskip("transformers")


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def pruned(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny GPT-2 in 20 kB shards, pruned 2:4: float32, and bfloat16 with --keep-dense."""
    root = tmp_path_factory.mktemp("compress")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir))
    out = {}
    for name, dtype, extra in (("fp32", torch.float32, ()), ("bf16", torch.bfloat16, ("--keep-dense",))):
        shards = root / f"gpt2-{name}"
        model.to(dtype).save_pretrained(shards, max_shard_size="20KB")
        assert len(list(shards.glob("model-*.safetensors"))) > 2
        code, _, err = run("prune", f"hf:{shards}", "-o", str(root / f"{name}-2of4"), *extra)
        assert code == 0, err
        out[name] = root / f"{name}-2of4"
    return out


@pytest.fixture(scope="module")
def compressed(pruned: dict[str, Path]) -> dict[str, tuple[Path, dict[str, object]]]:
    out = {}
    for name, folder in pruned.items():
        code, stdout, err = run("export", str(folder), "--compress", "--json")
        assert code == 0, err
        report = json.loads(stdout)
        out[name] = (Path(report["compressed"]), report)
    return out


def _bits(value: torch.Tensor) -> torch.Tensor:
    return value.contiguous().view(torch.uint8)


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_same_weights_masks_and_dense_bit_for_bit(
    pruned: dict[str, Path], compressed: dict[str, tuple[Path, dict[str, object]]], name: str
) -> None:
    folder, report = compressed[name]
    assert folder == pruned[name].parent / f"{pruned[name].name}-compressed"  # beside the input
    assert report["onnx"] is None
    with ShardedCheckpointReader(pruned[name]) as a, ShardedCheckpointReader(folder) as b:
        assert a.meta is not None and b.meta is not None
        assert sorted(b.state_names) == sorted(a.state_names)
        assert sorted(b.mask_names) == sorted(a.mask_names) == sorted(e.param for e in a.meta.layers)
        assert sorted(b.dense_names) == sorted(a.dense_names) and (name == "fp32") == (not a.dense_names)
        for key in a.state_names:  # +0.0 and every other bit pattern, in the stored dtype
            x, y = a.tensor(key), b.tensor(key)
            assert x.dtype == y.dtype and x.shape == y.shape and b.shape(key) == a.shape(key), key
            assert torch.equal(_bits(x), _bits(y)), key
        for param in a.mask_names:
            assert torch.equal(a.mask(param), b.mask(param)), param
            assert (a.packed_mask_array(param) == b.packed_mask_array(param)).all()
            assert b.shape(MASK_PREFIX + param) == a.shape(MASK_PREFIX + param)
        for param in a.dense_names:
            assert torch.equal(_bits(a.dense(param)), _bits(b.dense(param)))
    # loaded whole and validated through the same reader
    x, y = load_checkpoint(pruned[name]), load_checkpoint(folder)
    assert all(torch.equal(_bits(x.tensors[k]), _bits(y.tensors[k])) for k in x.tensors)
    assert all(torch.equal(x.masks[k], y.masks[k]) for k in x.masks)
    # smaller than the uncompressed directory
    assert (
        report["compressed_bytes"]
        == directory_bytes(folder)
        < directory_bytes(pruned[name])
        == report["original_bytes"]
    )


def test_layout_of_the_compressed_directory(
    pruned: dict[str, Path], compressed: dict[str, tuple[Path, dict[str, object]]]
) -> None:
    source, (folder, _) = pruned["bf16"], compressed["bf16"]
    shards = sorted(p.name for p in source.glob("model-*.safetensors"))
    assert sorted(p.name for p in folder.glob("model-*.safetensors")) == shards
    assert {p.name for p in folder.iterdir()} == {p.name for p in source.iterdir()}  # config etc. copied
    meta = read_meta(source)
    assert meta is not None
    layers = {e.param for e in meta.layers}
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    for shard in shards:  # each shard holds the compressed form of the tensors it held
        before = {t.name for t in read_header(source / shard).tensors}
        header = read_header(folder / shard)
        expected = {f"{p}{n}" for n in before & layers for p in (VALUES_PREFIX, INDICES_PREFIX)} | (before - layers)
        assert {t.name for t in header.tensors} == expected  # masks are exact here: not stored
        assert header.metadata["format"] == COMPRESSED_FORMAT
        assert all(weight_map[t.name] == shard for t in header.tensors)
    assert len(weight_map) == sum(len(read_header(folder / s).tensors) for s in shards)
    sidecar = read_header(folder / SIDECAR)
    assert sidecar.metadata["format"] == COMPRESSED_FORMAT and sidecar.metadata["layout"] == "sharded"
    assert {t.name for t in sidecar.tensors} == {DENSE_PREFIX + p for p in layers}  # --keep-dense weights only
    after = read_meta(folder)
    assert after is not None
    assert after.history[-1]["command"] == "export" and after.history[-1]["arguments"]["compress"] is True
    assert after.history[:-1] == meta.history and after.layers == meta.layers
    with ShardedCheckpointReader(source) as x, ShardedCheckpointReader(folder) as y:
        assert y.compressed and y.decoded_bytes == x.model.total_bytes  # load's memory check


def test_inspect_strict_and_sad_without_torch(
    pruned: dict[str, Path], compressed: dict[str, tuple[Path, dict[str, object]]]
) -> None:
    script = (
        "import sys\nfrom nmcli.cli.app import main\ntry:\n    main()\nfinally:\n"
        "    sys.stderr.write('torch imported: %s\\n' % ('torch' in sys.modules))\n"
    )
    folder = str(compressed["bf16"][0])
    for args in (("inspect", folder, "--strict", "--json"), ("sad", str(pruned["bf16"]), folder, "--json")):
        proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        assert "torch imported: False" in proc.stderr
        out = json.loads(proc.stdout)
        if args[0] == "inspect":
            assert out["compliant"] is True and out["eligible_layers"] == len(out["layers"]) == 8
            assert all(abs(layer["sparsity"] - 0.5) < 1e-9 for layer in out["layers"])
        else:
            assert out["sad"] == 0 and out["total"] > 0


def test_the_model_loads_the_same(
    pruned: dict[str, Path], compressed: dict[str, tuple[Path, dict[str, object]]]
) -> None:
    a, b = load_model(str(pruned["fp32"])), load_model(str(compressed["fp32"][0]))
    ids = torch.arange(16).reshape(1, 16)
    with torch.no_grad():
        assert torch.equal(a.model(ids).logits, b.model(ids).logits)


def test_refuses_without_force_and_never_overwrites_an_input(
    pruned: dict[str, Path], compressed: dict[str, tuple[Path, dict[str, object]]], tmp_path: Path
) -> None:
    source, (folder, _) = pruned["fp32"], compressed["fp32"]
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}
    code, out, _ = run("export", str(source), "--compress", "--json")
    assert code == 2 and "--force" in json.loads(out)["error"]["message"]
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()} == before
    code, out, _ = run("export", str(source), "--compress", "-o", str(source), "--force", "--json")
    assert code == 2 and "input" in json.loads(out)["error"]["message"]
    code, out, _ = run("export", str(source), "--compress", "-o", str(tmp_path / "x.safetensors"), "--json")
    assert code == 2 and "give -o a directory name" in json.loads(out)["error"]["message"]
    (tmp_path / "not-ours").mkdir()
    code, out, _ = run("export", str(source), "--compress", "-o", str(tmp_path / "not-ours"), "--force", "--json")
    assert code == 2 and "replaces only" in json.loads(out)["error"]["message"]
    code, out, err = run("export", str(source), "--compress", "-o", str(tmp_path / "again"), "--json")
    assert code == 0, err
    code, out, err = run("export", str(source), "--compress", "-o", str(tmp_path / "again"), "--force", "--json")
    assert code == 0, err
    assert not list(tmp_path.glob("again.*"))  # no temporary or old directory left


def test_interrupted_leaves_nothing(pruned: dict[str, Path], tmp_path: Path) -> None:
    calls: list[str] = []

    def stop(done: int, total: int, label: str) -> None:
        calls.append(label)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress_directory(pruned["fp32"], tmp_path / "out", progress=stop)
    assert calls[0].startswith("shard 1/") and "MB/s" in calls[0]
    assert list(tmp_path.iterdir()) == []


def test_a_mask_the_indices_do_not_name_is_stored(pruned: dict[str, Path], tmp_path: Path) -> None:
    """A group keeping fewer than n (a kept weight set to zero and dropped from the mask): the mask is stored."""
    import shutil

    folder = tmp_path / "fewer"
    shutil.copytree(pruned["fp32"], folder)
    meta = read_meta(folder)
    assert meta is not None
    param = meta.layers[0].param
    with ShardedCheckpointReader(folder) as reader:
        shard = reader.model.tensors[param].file
        mask = reader.mask(param)
    mask.view(-1)[mask.view(-1).nonzero()[0]] = False  # the first kept weight
    for file, change in ((shard, param), (SIDECAR, MASK_PREFIX + param)):
        with safe_open(str(folder / file), "pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
            metadata = fh.metadata()
        tensors[change] = pack_mask(mask) if change.startswith(MASK_PREFIX) else tensors[change] * mask
        save_file(tensors, str(folder / file), metadata)
    out = compress_directory(folder, tmp_path / "fewer-compressed")
    assert MASK_PREFIX + param in {t.name for t in read_header(out / shard).tensors}
    with ShardedCheckpointReader(folder) as a, ShardedCheckpointReader(out) as b:
        assert torch.equal(a.mask(param), b.mask(param)) and torch.equal(_bits(a.tensor(param)), _bits(b.tensor(param)))

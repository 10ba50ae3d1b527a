"""The one classifier of an input (nmcli.formats.open.classify) and the one way to open a checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nmcli.errors import CheckpointError
from nmcli.formats.checkpoint import (
    Checkpoint,
    CheckpointMeta,
    CheckpointReader,
    LayerEntry,
    SourceRef,
    save_checkpoint,
    write_compressed,
)
from nmcli.formats.open import (
    Form,
    classify,
    form_by_name,
    load_checkpoint,
    named_form,
    open_checkpoint,
    prefix_of,
    read_meta,
)
from nmcli.formats.safetensors import write_safetensors
from nmcli.formats.sharded import INDEX, SIDECAR, SINGLE
from nmcli.formats.sharded_checkpoint import ShardedCheckpointReader
from nmcli.nm.masks import apply_mask, nm_mask
from nmcli.nm.pattern import Pattern

P24 = Pattern(2, 4)
SUFFIXES = {
    ".safetensors": Form.STATE_DICT,
    ".pt": Form.TORCH_FILE,
    ".PTH": Form.TORCH_FILE,
    ".pth.tar": Form.TORCH_FILE,
    ".bin": Form.TORCH_FILE,
    ".ckpt": Form.TORCH_FILE,
    ".pt2": Form.EXPORTED,
    ".onnx": Form.ONNX,
    ".engine": Form.ENGINE,
    ".plan": Form.ENGINE,
    ".trt": Form.ENGINE,
    ".txt": Form.OTHER,
    "": Form.OTHER,
}


def _checkpoint() -> Checkpoint:
    weight = torch.arange(32, dtype=torch.float32).reshape(4, 8) - 16
    mask = nm_mask(weight, P24, 1)
    meta = CheckpointMeta(
        source=SourceRef("py:/models.py:build"),
        pattern=P24,
        layers=[LayerEntry("fc.weight", "fc", 2, 4, 1, (4, 8))],
        input_spec="1x8",
    )
    tensors = {"fc.weight": apply_mask(weight, mask), "fc.bias": torch.zeros(4)}
    return Checkpoint(tensors=tensors, masks={"fc.weight": mask}, meta=meta)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One hand-made input of every kind a local path can be."""
    root = tmp_path_factory.mktemp("kinds")
    out: dict[str, Path] = {}
    out["checkpoint"] = save_checkpoint(_checkpoint(), root / "c.safetensors")
    out["compressed"] = write_compressed(_checkpoint(), root / "c-compressed.safetensors")
    out["state_dict"] = root / "plain.safetensors"
    write_safetensors({"w": torch.ones(2, 4)}, out["state_dict"], {})
    out["torch"] = root / "w.pt"
    torch.save({"w": torch.ones(2)}, out["torch"])
    for name, data in (("exported", "p.pt2"), ("onnx", "m.onnx"), ("engine", "m.engine"), ("other", "notes.txt")):
        out[name] = root / data
        out[name].write_bytes(b"never opened")
    for name, members in (
        ("sharded", (SIDECAR, "config.json", INDEX)),
        ("hf_sharded", ("config.json", INDEX, "model-00001-of-00002.safetensors")),
        ("hf_single", ("config.json", SINGLE)),
        ("hf_other", ("config.json", "pytorch_model.bin")),
        ("directory", ("readme.md",)),
    ):
        folder = root / name
        folder.mkdir()
        for member in members:
            (folder / member).write_bytes(b"{}")
        out[name] = folder
    return out


@pytest.mark.parametrize(
    ("name", "form"),
    [
        ("checkpoint", Form.CHECKPOINT),
        ("compressed", Form.COMPRESSED),
        ("state_dict", Form.STATE_DICT),
        ("torch", Form.TORCH_FILE),
        ("exported", Form.EXPORTED),
        ("onnx", Form.ONNX),
        ("engine", Form.ENGINE),
        ("other", Form.OTHER),
        ("sharded", Form.SHARDED_CHECKPOINT),
        ("hf_sharded", Form.HF_SHARDED),
        ("hf_single", Form.HF_SINGLE),
        ("hf_other", Form.HF_OTHER),
        ("directory", Form.DIRECTORY),
    ],
)
def test_every_local_kind(files: dict[str, Path], name: str, form: Form) -> None:
    kind = classify(str(files[name]))
    assert kind.form is form and kind.path == files[name] and kind.prefix == ""
    assert kind.is_checkpoint == (form in (Form.CHECKPOINT, Form.COMPRESSED, Form.SHARDED_CHECKPOINT))
    assert kind.is_directory == files[name].is_dir()
    assert kind.is_file == files[name].is_file()
    assert kind.is_streamable == (form in (Form.HF_SHARDED, Form.HF_SINGLE))
    assert classify(files[name]).form is form  # a Path works as well as its text


def test_hf_prefix_resolves_a_local_directory(files: dict[str, Path]) -> None:
    for name, form in (("hf_single", Form.HF_SINGLE), ("sharded", Form.SHARDED_CHECKPOINT)):
        kind = classify(f"hf:{files[name]}")
        assert (kind.form, kind.path, kind.prefix, kind.named) == (form, files[name], "hf:", Form.SOURCE)
        assert kind.is_hf_directory
    hub = classify("hf:org/no-such-model")
    assert (hub.form, hub.path, hub.prefix) == (Form.SOURCE, None, "hf:")
    assert not classify(str(files["directory"])).is_hf_directory


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "timm:vit_tiny", "py:pkg.mod:build", "hf:", "hf:gpt2"])
def test_prefixed_sources_are_not_looked_up(spec: str) -> None:
    kind = classify(spec)
    assert kind.form is Form.SOURCE and kind.named is Form.SOURCE and kind.path is None
    assert kind.prefix == prefix_of(spec) != ""


def test_empty_missing_and_special(tmp_path: Path) -> None:
    for blank in ("", "  "):
        assert classify(blank).form is Form.EMPTY and classify(blank).path is None
    missing = classify(str(tmp_path / "gone.onnx"))
    assert (missing.form, missing.named, missing.path) == (Form.MISSING, Form.ONNX, tmp_path / "gone.onnx")
    assert classify(str(tmp_path / ("x" * 5000))).form is Form.MISSING  # a name too long is nothing there
    home = classify("~/surely-not-here-nmcli.safetensors")
    assert home.path == Path(os.path.expanduser("~")) / "surely-not-here-nmcli.safetensors"
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "pipe.safetensors"
        os.mkfifo(fifo)
        kind = classify(str(fifo))  # never opened: opening a FIFO would block
        assert kind.form is Form.SPECIAL and kind.named is Form.STATE_DICT and not kind.is_file


def test_unreadable_safetensors_says_so_as_the_reader_does(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as caught:
        classify(str(bad))
    with pytest.raises(CheckpointError) as direct:
        CheckpointReader(bad)
    assert str(caught.value) == str(direct.value)
    future = tmp_path / "future.safetensors"
    write_safetensors({"w": torch.ones(1)}, future, {"format": "nmcli/9", "nmcli": "{}"})
    with pytest.raises(CheckpointError, match="upgrade nmcli"):
        classify(str(future))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    stem=st.text(
        alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\:"), min_size=1, max_size=30
    ),
    suffix=st.sampled_from(sorted(SUFFIXES)),
)
def test_odd_names_are_named_by_their_suffix(tmp_path: Path, stem: str, suffix: str) -> None:
    name = stem + suffix
    if name in (".", "..") or len(name.encode()) > 200:
        return
    expected = SUFFIXES[suffix] if suffix else form_by_name(name)
    assert form_by_name(name) is expected and named_form(name) is expected
    path = tmp_path / name
    kind = classify(str(path))
    assert kind.named is expected
    if not path.exists():
        assert kind.form is Form.MISSING
    if expected in (Form.TORCH_FILE, Form.EXPORTED, Form.ONNX, Form.ENGINE):
        path.write_bytes(b"\x00")  # never opened: any bytes
        assert classify(str(path)).form is expected
        path.unlink()


@given(spec=st.text(max_size=40))
def test_named_form_never_touches_the_disk_and_never_raises(spec: str) -> None:
    form = named_form(spec)
    assert isinstance(form, Form)
    assert (form is Form.SOURCE) == (bool(spec.strip()) and prefix_of(spec) != "")


def test_open_checkpoint_picks_the_file_reader(files: dict[str, Path]) -> None:
    for name in ("checkpoint", "compressed", "state_dict"):
        with open_checkpoint(files[name]) as reader:
            assert isinstance(reader, CheckpointReader)
            assert reader.is_nmcli == (name != "state_dict")
            assert reader.compressed == (name == "compressed")
    with open_checkpoint(classify(str(files["checkpoint"])), numpy=True) as reader:
        packed = reader.packed_mask_array("fc.weight")
        assert isinstance(reader.tensor("fc.weight"), np.ndarray) and packed.dtype == np.uint8
        assert reader.integrity().status == "ok"
    plain, compressed = load_checkpoint(files["checkpoint"]), load_checkpoint(files["compressed"])
    assert all(torch.equal(plain.tensors[k], compressed.tensors[k]) for k in plain.tensors)
    assert read_meta(files["compressed"]) is not None and read_meta(files["state_dict"]) is None
    assert read_meta(files["hf_single"]) is None


def test_open_checkpoint_reports_what_is_not_one(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "gone.safetensors")
    with pytest.raises(CheckpointError, match="is a directory"):
        open_checkpoint(files["directory"])


def test_both_readers_answer_the_same_surface(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """A sharded checkpoint and the same model pruned into one file read alike through open_checkpoint."""
    from nmcli.commands.prune import run_prune

    shards = tmp_path / "gpt2-shards"
    transformers = pytest.importorskip("transformers")
    transformers.AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir)).save_pretrained(
        shards, max_shard_size="100KB"
    )
    sharded, single = tmp_path / "sharded-2of4", tmp_path / "single-2of4.safetensors"
    run_prune(str(shards), output=sharded)
    run_prune(f"hf:{shards}", output=single)
    assert classify(str(sharded)).form is Form.SHARDED_CHECKPOINT and classify(str(single)).form is Form.CHECKPOINT
    with open_checkpoint(sharded, numpy=True) as a, open_checkpoint(single, numpy=True) as b:
        assert isinstance(a, ShardedCheckpointReader) and isinstance(b, CheckpointReader)
        assert a.is_nmcli and b.is_nmcli and not a.compressed
        params = sorted(a.mask_names)
        assert params and params == sorted(b.mask_names)
        assert set(a.state_names) <= set(b.state_names)
        for param in a.mask_names:
            assert a.shape(param) == b.shape(param)
            assert np.array_equal(a.packed_mask_array(param), b.packed_mask_array(param))
    whole = load_checkpoint(sharded)
    assert sorted(whole.masks) == params
    assert json.loads(json.dumps(read_meta(sharded).to_json()))["layers"]  # type: ignore[union-attr]


def test_classify_and_open_stay_torch_free(files: dict[str, Path]) -> None:
    code = (
        "import sys\n"
        "from nmcli.formats.open import classify, open_checkpoint\n"
        f"for p in {[str(p) for p in files.values()]!r}:\n"
        "    classify(p)\n"
        f"with open_checkpoint({str(files['compressed'])!r}, numpy=True) as r:\n"
        "    r.packed_mask_array('fc.weight')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr

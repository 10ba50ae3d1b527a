"""Issue 19, integrity: ``inspect`` checks a sharded output's weights against its masks, and every nmcli
file's content against the sha256 it records (tampering is exit 1 under ``--strict``)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.formats.checksum import CHECKSUM_KEY, TAMPERED
from nmcli.formats.open import compress_checkpoint, read_meta
from nmcli.formats.sharded import SIDECAR, ShardedModel
from tests.conftest import py_source

transformers = pytest.importorskip("transformers")
runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def inspect_json(target: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    code, out, err = run("inspect", str(target), "--json", *extra)
    return code, json.loads(out), err


@pytest.fixture(scope="module")
def gpt2_shards(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 saved in 20 kB shards (as tests/cli/test_sharded_cli.py)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir))
    out = tmp_path_factory.mktemp("shards") / "gpt2-sharded"
    model.save_pretrained(out, max_shard_size="20KB")
    return out


@pytest.fixture(scope="module")
def sharded(gpt2_shards: Path) -> Path:
    """A sharded output whose sidecar holds dense weights too (tensor data besides the masks)."""
    out = gpt2_shards.parent / "gpt2-2of4"
    code, _, err = run("prune", f"hf:{gpt2_shards}", "-o", str(out), "--keep-dense")
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "mlp-2of4.safetensors"
    code, _, err = run("prune", py_source("tiny_mlp"), "-o", str(out))
    assert code == 0, err
    return out


def _header(path: Path) -> tuple[dict[str, Any], int]:
    blob = path.read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + size]), 8 + size


def _edit_header(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite a file's header (its recorded checksum kept as it was), the data untouched."""
    header, start = _header(path)
    data = path.read_bytes()[start:]
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _edit_nmcli(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    def edit(header: dict[str, Any]) -> None:
        meta = json.loads(header["__metadata__"]["nmcli"])
        change(meta)
        header["__metadata__"]["nmcli"] = json.dumps(meta, separators=(",", ":"))

    _edit_header(path, edit)


def _flip_byte(path: Path, tensor: str) -> None:
    """Flip the lowest bit of a tensor's first byte (a float's lowest mantissa bit: still finite, still non-zero)."""
    header, start = _header(path)
    offset = start + header[tensor]["data_offsets"][0]
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 1
    path.write_bytes(bytes(blob))


def _set_history(meta: dict[str, Any]) -> None:
    meta["history"][0]["arguments"]["pattern"] = "1:4"


EDITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "source-sha256": lambda meta: meta["source"].update(sha256="0" * 64),
    "spec": lambda meta: meta["source"].update(spec="py:helper.py:build"),
    "trusted": lambda meta: meta["source"].update(trusted=True),
    "history": _set_history,
}


def _copy(target: Path, tmp_path: Path) -> Path:
    dest = tmp_path / target.name
    if target.is_dir():
        shutil.copytree(target, dest)
    else:
        shutil.copy(target, dest)
    return dest


# --------------------------------------------------------------------------------------------
# Weights against masks


def test_untouched_outputs_are_ok(sharded: Path, single: Path) -> None:
    for target in (sharded, single):
        code, report, err = inspect_json(target, "--strict")
        assert code == 0, err
        assert report["integrity"] == "ok" and report["tampered_files"] == [] and report["masks_only"] is False
        assert "integrity: ok" in err
    code, report, _ = inspect_json(sharded, "--strict")
    assert all(layer["pruned_nonzero"] == 0 and layer["compliant"] for layer in report["layers"])
    assert "every pruned weight in the shards checked" in run("inspect", str(sharded))[2]


def test_a_truncated_shard_is_refused_even_where_no_pruned_weight_lies(sharded: Path, tmp_path: Path) -> None:
    """The last bytes of a shard may hold an unpruned tensor: the file is still truncated, for every command."""
    bad = _copy(sharded, tmp_path)
    shard = sorted(bad.glob("model-*.safetensors"))[-1]
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size - 1)
    for args in (["inspect", str(bad), "--strict"], ["inspect", str(bad), "--masks-only"], ["sad", str(bad), str(bad)]):
        code, _, err = run(*args)
        assert code == 2 and "it is truncated" in err and len(err.strip().splitlines()) == 1, (args, err)


def test_dense_weights_behind_intact_masks_fail_strict(gpt2_shards: Path, sharded: Path, tmp_path: Path) -> None:
    bad = _copy(sharded, tmp_path)
    meta = read_meta(bad)
    assert meta is not None
    layer = meta.layers[1].param
    dense, out = ShardedModel.open(gpt2_shards).tensors[layer], ShardedModel.open(bad).tensors[layer]
    source_start, out_start = _header(gpt2_shards / dense.file)[1], _header(bad / out.file)[1]
    weights = (gpt2_shards / dense.file).read_bytes()[source_start + dense.begin : source_start + dense.end]
    blob = bytearray((bad / out.file).read_bytes())
    blob[out_start + out.begin : out_start + out.end] = weights  # the unpruned weights, the masks untouched
    (bad / out.file).write_bytes(bytes(blob))

    code, report, err = inspect_json(bad, "--strict")
    assert code == 1
    assert report["compliant"] is False and report["integrity"] == "ok"  # the sidecar was not edited
    layers = {x["param"]: x for x in report["layers"]}
    assert layers[layer]["compliant"] is False and layers[layer]["pruned_nonzero"] > 0
    assert all(x["compliant"] and x["pruned_nonzero"] == 0 for name, x in layers.items() if name != layer)
    assert f"layer {layer}:" in err and "where its mask prunes them" in err

    code, report, err = inspect_json(bad, "--strict", "--masks-only")
    assert code == 0, err
    assert report["compliant"] is True and report["masks_only"] is True
    assert all(x["pruned_nonzero"] is None for x in report["layers"])
    code, _, err = run("inspect", str(bad), "--strict", "--masks-only")
    assert code == 0 and "--masks-only: measured on its stored masks only" in err


def test_every_shard_dense_fails_every_layer(gpt2_shards: Path, sharded: Path, tmp_path: Path) -> None:
    bad = _copy(sharded, tmp_path)
    for shard in ShardedModel.open(gpt2_shards).files:  # the output shards keep the input's names and layout
        shutil.copy(gpt2_shards / shard, bad / shard)
    code, report, _ = inspect_json(bad, "--strict")
    assert code == 1
    assert report["eligible_layers"] > 0 and all(not x["compliant"] for x in report["layers"])


def test_weight_check_does_not_import_torch(sharded: Path) -> None:
    script = (
        "import sys\nfrom nmcli.cli.app import main\ntry:\n    main()\nfinally:\n"
        "    sys.stderr.write('torch imported: %s\\n' % ('torch' in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, "inspect", str(sharded), "--strict", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "torch imported: False" in proc.stderr
    assert json.loads(proc.stdout)["integrity"] == "ok"


# --------------------------------------------------------------------------------------------
# Tampering


@pytest.mark.parametrize("edit", sorted(EDITS))
@pytest.mark.parametrize("kind", ["file", "sidecar"])
def test_metadata_edits_are_tampering(sharded: Path, single: Path, tmp_path: Path, kind: str, edit: str) -> None:
    target = _copy(single if kind == "file" else sharded, tmp_path)
    edited = target if kind == "file" else target / SIDECAR
    _edit_nmcli(edited, EDITS[edit])
    code, report, err = inspect_json(target)
    assert code == 0, err  # reported; only --strict fails on it
    assert report["integrity"] == "mismatch" and report["tampered_files"] == [edited.name]
    assert report["compliant"] is True
    assert TAMPERED in err and "tampered:" in err
    code, _, err = run("inspect", str(target), "--strict")
    assert code == 1 and TAMPERED in err


@pytest.mark.parametrize("kind", ["file", "sidecar"])
def test_a_data_byte_edit_is_tampering(sharded: Path, single: Path, tmp_path: Path, kind: str) -> None:
    target = _copy(single if kind == "file" else sharded, tmp_path)
    if kind == "file":
        _flip_byte(target, "0.bias")
    else:
        dense = next(name for name in _header(target / SIDECAR)[0] if name.startswith("__nmcli__/dense/"))
        _flip_byte(target / SIDECAR, dense)
    code, report, _ = inspect_json(target, "--strict")
    assert code == 1
    assert report["integrity"] == "mismatch" and report["compliant"] is True


def test_a_tampered_invalid_file_says_both(single: Path, tmp_path: Path) -> None:
    target = _copy(single, tmp_path)
    mask = next(name for name in _header(target)[0] if name.startswith("__nmcli__/mask/"))
    header, start = _header(target)
    blob = bytearray(target.read_bytes())
    begin, end = header[mask]["data_offsets"]
    blob[start + begin : start + end] = b"\xff" * (end - begin)  # keeps everything: breaks 2:4
    target.write_bytes(bytes(blob))
    code, out, _ = run("inspect", str(target), "--strict", "--json")
    assert code == 2
    message = json.loads(out)["error"]["message"]
    assert "breaking 2:4" in message and TAMPERED in message


@pytest.mark.parametrize("kind", ["file", "sidecar"])
def test_without_a_checksum_is_absent_not_tampering(sharded: Path, single: Path, tmp_path: Path, kind: str) -> None:
    target = _copy(single if kind == "file" else sharded, tmp_path)
    _edit_header(target if kind == "file" else target / SIDECAR, lambda h: h["__metadata__"].pop(CHECKSUM_KEY))
    code, report, err = inspect_json(target, "--strict")
    assert code == 0, err
    assert report["integrity"] == "absent" and report["tampered_files"] == []
    assert "records no sha256" in err and TAMPERED not in err


def test_compressed_outputs_carry_and_check_it(sharded: Path, single: Path, tmp_path: Path) -> None:
    from nmcli.formats.sharded_compress import compress_directory

    folder = compress_directory(sharded, tmp_path / "compressed")
    file = compress_checkpoint(single, tmp_path / "compressed.safetensors")
    for target in (folder, file):
        code, report, err = inspect_json(target, "--strict")
        assert code == 0, err
        assert report["integrity"] == "ok"
    assert all(x["pruned_nonzero"] == 0 for x in inspect_json(folder)[1]["layers"])
    shard = next(
        p for p in sorted(folder.glob("model-*.safetensors")) if "__nmcli__/nm/values/" in p.read_text("latin-1")
    )
    values = next(name for name in _header(shard)[0] if name.startswith("__nmcli__/nm/values/"))
    _flip_byte(shard, values)
    code, report, _ = inspect_json(folder, "--strict")
    assert code == 1 and report["tampered_files"] == [shard.name]
    code, report, _ = inspect_json(folder, "--strict", "--masks-only")  # the shards are not read
    assert code == 0 and report["integrity"] == "ok"

"""``nmcli prune`` end to end: the MiniLM acceptance test, options, --json, and every error path."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import Result
from safetensors.torch import save_file
from typer.testing import CliRunner

from fixtures.models import tiny_cnn, tiny_mlp
from nmcli.cli.app import app
from nmcli.formats.checkpoint import read_state_dict
from nmcli.formats.open import load_checkpoint
from nmcli.nm.masks import group_counts
from tests.conftest import py_source

runner = CliRunner()


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _one_error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "Traceback" not in result.output
    return lines[0]


# --------------------------------------------------------------------------------------------
# The acceptance test: the real MiniLM, pruned 2:4, then inspect --strict


@pytest.fixture(scope="module")
def pruned_minilm(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("minilm") / "minilm-2of4.safetensors"
    result = invoke("prune", f"hf:{minilm_dir}", "-p", "2:4", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_minilm_all_36_encoder_linears_pruned(pruned_minilm: tuple[Path, dict]) -> None:
    out, report = pruned_minilm
    assert report["output"] == str(out) and report["pattern"] == "2:4" and report["method"] == "magnitude"
    encoder = [layer for layer in report["layers"] if layer["param"].startswith("encoder.")]
    assert len(encoder) == 36 and all(layer["status"] == "pruned" for layer in encoder)
    assert all(0.5 < layer["kept_magnitude"] < 1.0 for layer in encoder)
    ckpt = load_checkpoint(out)
    assert {p for p in ckpt.masks if p.startswith("encoder.")} == {layer["param"] for layer in encoder}
    for entry in ckpt.meta.layers:
        counts = group_counts(ckpt.tensors[entry.param], 4, entry.axis)
        assert bool(counts.le(2).all())
    pruned = sum(int((~m).sum()) for m in ckpt.masks.values())
    assert report["params_pruned"] == pruned and report["sparsity"] == pytest.approx(pruned / report["params_total"])
    assert ckpt.meta.input_spec == "input_ids:1x128:int64,attention_mask:1x128:int64"
    assert ckpt.meta.history[-1]["command"] == "prune"


def test_minilm_checkpoint_loads_into_the_plain_architecture(
    pruned_minilm: tuple[Path, dict], minilm_dir: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    out, _ = pruned_minilm
    model = transformers.BertModel(transformers.AutoConfig.from_pretrained(minilm_dir))
    model.load_state_dict(read_state_dict(out), strict=True)
    weight = model.encoder.layer[0].attention.self.query.weight
    assert float(weight.eq(0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_inspect_strict_passes_on_pruned_minilm(pruned_minilm: tuple[Path, dict]) -> None:
    out, _ = pruned_minilm
    result = invoke("inspect", str(out), "--strict", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["compliant"] is True and report["pattern"] == "2:4"
    encoder = [layer for layer in report["layers"] if layer["param"].startswith("encoder.")]
    assert len(encoder) == 36 and all(layer["eligible"] and layer["compliant"] for layer in encoder)
    assert all(layer["sparsity"] == pytest.approx(0.5) and layer["tensorrt"] for layer in encoder)


def test_inspect_strict_fails_on_dense_minilm(minilm_dir: Path) -> None:
    result = invoke("inspect", f"hf:{minilm_dir}", "--strict", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)  # the report is emitted before the failure
    assert report["compliant"] is False
    assert sum(1 for layer in report["layers"] if layer["eligible"] and not layer["compliant"]) == 37
    line = _one_error_line(result)
    assert "37 of 37 eligible layer(s)" in line and "not 2:4-compliant" in line


# --------------------------------------------------------------------------------------------
# Options and output


def test_human_output_goes_to_stderr(workdir: Path) -> None:
    result = invoke("prune", py_source("tiny_cnn"), "-o", "cnn.safetensors")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "prune 2:4 (magnitude)" in result.stderr and "5.weight" in result.stderr  # the table
    assert "pruned 3 of 5 layers to 2:4" in result.stderr and "cnn.safetensors" in result.stderr


def test_json_is_exactly_one_object_on_stdout(workdir: Path) -> None:
    result = invoke("prune", py_source("tiny_cnn"), "-o", "cnn.safetensors", "--json")
    assert result.exit_code == 0
    assert "prune 2:4 (magnitude)" in result.stderr  # the table stays on stderr, like every command's
    assert result.stdout.count("\n") == 1
    report = json.loads(result.stdout)
    assert set(report) == {
        "output", "pattern", "method", "calib_samples", "calibration_path", "bn_recalibrated", "params_total", "params_pruned",
        "sparsity", "notes", "layers",
    }  # fmt: skip
    assert set(report["layers"][0]) == {
        "name", "param", "shape", "status", "reason", "kept_magnitude", "recon_error", "note",
    }  # fmt: skip
    assert any("BatchNorm" in note and "--calib" in note for note in report["notes"])
    statuses = {layer["param"]: (layer["status"], layer["reason"]) for layer in report["layers"]}
    assert statuses["0.weight"] == ("skipped", "input dimension 3 is not a multiple of M=4")
    assert statuses["5.weight"][0] == "skipped" and statuses["8.weight"] == ("pruned", "")
    # Hand count: conv 32x16x3x3, linear 64x512, linear 10x64 lose half their weights each.
    assert report["params_pruned"] == (32 * 16 * 9 + 64 * 512 + 10 * 64) // 2
    assert report["params_total"] == sum(p.numel() for p in tiny_cnn().parameters())


def test_default_output_sits_beside_the_input(workdir: Path) -> None:
    (workdir / "models").mkdir()
    torch.jit.script(tiny_mlp()).save("models/mlp.pt")
    result = invoke("prune", "models/mlp.pt", "-p", "1:4", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"] == os.path.join("models", "mlp-1of4.safetensors")
    ckpt = load_checkpoint(workdir / "models" / "mlp-1of4.safetensors")
    assert str(ckpt.pattern) == "1:4" and ckpt.meta.source.spec == str(workdir / "models" / "mlp.pt")


def test_non_2_4_pattern_gets_a_note(workdir: Path) -> None:
    result = invoke("prune", py_source("tiny_mlp"), "-p", "2:8", "-o", "m.safetensors")
    assert result.exit_code == 0
    assert "note:" in result.stderr and "only 2:4 is" in result.stderr


def test_include_exclude_and_keep_dense(workdir: Path) -> None:
    result = invoke(
        "prune", py_source("tiny_cnn"), "--include", "[28]", "--exclude", "2", "--keep-dense", "-o", "c.safetensors"
    )
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(workdir / "c.safetensors")
    assert list(ckpt.masks) == ["8.weight"] and list(ckpt.dense) == ["8.weight"]
    assert torch.equal(ckpt.dense["8.weight"], tiny_cnn().state_dict()["8.weight"])
    assert "matched by --exclude" in result.stderr and "not matched by --include" in result.stderr


def test_reprune_a_checkpoint_prunes_its_dense_weights(workdir: Path) -> None:
    assert invoke("prune", py_source("tiny_mlp"), "--keep-dense", "-o", "a.safetensors").exit_code == 0
    result = invoke("prune", "a.safetensors", "-p", "1:4", "-o", "b.safetensors", "--json")
    assert result.exit_code == 0, result.output
    b = load_checkpoint(workdir / "b.safetensors")
    dense = tiny_mlp().state_dict()["0.weight"]
    assert torch.equal(b.masks["0.weight"], group_counts(b.masks["0.weight"], 4, 1).le(1).all() and b.masks["0.weight"])
    kept = b.tensors["0.weight"][b.masks["0.weight"]]
    assert torch.equal(kept, dense[b.masks["0.weight"]])  # chosen from the dense weights, not the 2:4 ones
    assert [h["command"] for h in b.meta.history] == ["prune", "prune"]


def test_force_overwrites(workdir: Path) -> None:
    assert invoke("prune", py_source("tiny_mlp"), "-o", "m.safetensors").exit_code == 0
    result = invoke("prune", py_source("tiny_mlp"), "-p", "1:4", "-o", "m.safetensors", "--force")
    assert result.exit_code == 0
    assert str(load_checkpoint(workdir / "m.safetensors").pattern) == "1:4"
    assert _files(workdir) == {"m.safetensors"}


# --------------------------------------------------------------------------------------------
# Every error path: exit 2, one line, no traceback, no output file


def _setup_inputs(folder: Path) -> None:
    torch.save(tiny_mlp().state_dict(), folder / "mlp_state.pt")
    save_file(tiny_mlp().state_dict(), str(folder / "mlp_state.safetensors"))
    torch.save(tiny_mlp(), folder / "mlp_pickle.pt")
    noise = random.Random(0).randbytes(2048)
    (folder / "noise.pt").write_bytes(noise)
    (folder / "noise.safetensors").write_bytes(noise)
    (folder / "noise.pt2").write_bytes(noise)
    (folder / "exists.safetensors").write_bytes(b"precious")
    (folder / "tiny.py").write_text("from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Linear(3, 5))\n")


ERRORS: list[tuple[str, Callable[[], list[str]], str]] = [
    ("bad-pattern", lambda: [py_source("tiny_mlp"), "-p", "2:5x"], "malformed pattern '2:5x'"),
    ("pattern-range", lambda: [py_source("tiny_mlp"), "-p", "4:2"], "0 < N < M <= 32"),
    ("missing-file", lambda: ["missing.pt"], "missing.pt does not exist"),
    ("random-pt", lambda: ["noise.pt"], "is not a torch file"),
    ("random-safetensors", lambda: ["noise.safetensors"], "not a readable safetensors file"),
    ("random-pt2", lambda: ["noise.pt2"], "is not a torch.export program"),
    ("truncated", lambda: ["truncated.safetensors"], "truncated"),
    ("unknown-factory", lambda: [py_source("no_such_factory")], "has no callable 'no_such_factory'"),
    ("unknown-module", lambda: ["py:no_such_pkg_xyz.models:build"], "module 'no_such_pkg_xyz' not found"),
    ("pickle-no-trust", lambda: ["mlp_pickle.pt"], "pass --trust"),
    ("state-no-arch", lambda: ["mlp_state.pt"], "pass --arch SPEC"),
    ("safetensors-no-arch", lambda: ["mlp_state.safetensors"], "pass --arch SPEC"),
    ("state-wrong-arch", lambda: ["mlp_state.pt", "--arch", py_source("tiny_cnn")], "does not fit the architecture"),
    (
        "safetensors-wrong-arch",
        lambda: ["mlp_state.safetensors", "--arch", py_source("tiny_attention")],
        "does not fit the architecture",
    ),
    ("exists", lambda: [py_source("tiny_mlp"), "-o", "exists.safetensors"], "already exists: pass --force"),
    (
        "input-is-output",
        lambda: ["mlp_state.safetensors", "--arch", py_source("tiny_mlp"), "-o", "mlp_state.safetensors", "--force"],
        "also an input",
    ),
    ("no-folder", lambda: [py_source("tiny_mlp"), "-o", "nope/m.safetensors"], "does not exist"),
    ("unknown-method", lambda: [py_source("tiny_mlp"), "--method", "random"], "unknown pruning method 'random'"),
    ("bad-input-shape", lambda: [py_source("tiny_mlp"), "--input-shape", "1xfoo"], "malformed input shape"),
    ("nothing-to-prune", lambda: ["py:tiny.py:build"], "no layer of py:tiny.py:build can be pruned to 2:4"),
]


@pytest.fixture()
def error_dir(workdir: Path) -> Path:
    _setup_inputs(workdir)
    assert invoke("prune", py_source("tiny_mlp"), "-o", "good.safetensors").exit_code == 0
    blob = (workdir / "good.safetensors").read_bytes()
    (workdir / "truncated.safetensors").write_bytes(blob[: len(blob) // 2])
    (workdir / "good.safetensors").unlink()
    return workdir


@pytest.mark.parametrize(("case", "args", "message"), ERRORS, ids=[e[0] for e in ERRORS])
def test_error_paths(error_dir: Path, case: str, args: Callable[[], list[str]], message: str) -> None:
    before = {p: (error_dir / p).read_bytes() for p in _files(error_dir) if (error_dir / p).is_file()}
    result = invoke("prune", *args())
    assert result.exit_code == 2, result.output
    assert message in _one_error_line(result)
    assert result.stdout == ""
    after = {p: (error_dir / p).read_bytes() for p in _files(error_dir) if (error_dir / p).is_file()}
    assert after == before  # nothing written, nothing overwritten, no temporary file left


def test_json_mode_errors_stay_off_stdout(error_dir: Path) -> None:
    result = invoke("prune", "missing.pt", "--json")
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]  # exactly one JSON object, on failure too
    assert error["code"] == 2 and "missing.pt does not exist" in error["message"]
    _one_error_line(result)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_missing_backend_is_exit_3(workdir: Path) -> None:
    result = invoke("prune", "torchvision:resnet18")
    assert result.exit_code == 3
    assert "pip install 'nmcli[vision]'" in _one_error_line(result)
    assert _files(workdir) == set()


# --------------------------------------------------------------------------------------------
# The real console script


def test_console_script_prune_json(nmcli_exe: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [nmcli_exe, "prune", py_source("tiny_attention"), "-o", "att.safetensors", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert proc.stdout.strip().count("\n") == 0
    pruned = {layer["param"] for layer in report["layers"] if layer["status"] == "pruned"}
    assert pruned == {"attn.in_proj_weight", "attn.out_proj.weight", "head.weight"}
    assert load_checkpoint(tmp_path / "att.safetensors").masks["attn.in_proj_weight"].shape == (96, 32)


def test_console_script_error_is_one_line(nmcli_exe: str, tmp_path: Path) -> None:
    (tmp_path / "noise.pt").write_bytes(random.Random(1).randbytes(512))
    proc = subprocess.run(
        [nmcli_exe, "prune", "noise.pt", "-o", "out.safetensors"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noise.pt"]

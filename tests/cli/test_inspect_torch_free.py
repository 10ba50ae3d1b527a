"""``inspect`` of an nmcli checkpoint without torch (issue 11 item 12).

The file-only path validates the checkpoint and measures its pruned layers with numpy on the
memory-mapped data; its report must equal the torch path's (``load_checkpoint`` +
``inspect_checkpoint``) and a fresh process that runs it must not import torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.commands.inspect import file_integrity, inspect_checkpoint, inspect_checkpoint_file, run_inspect
from nmcli.errors import CheckpointError
from nmcli.formats.checkpoint import FORMAT, MASK_PREFIX, CheckpointReader, save_checkpoint
from nmcli.formats.onnx_layout import negative_zeros, weight_compliance
from nmcli.formats.open import load_checkpoint
from nmcli.formats.safetensors import write_safetensors
from nmcli.nm.bits import pack_mask
from nmcli.nm.pattern import Pattern, parse_pattern
from tests.conftest import py_source

runner = CliRunner()


def _prune(source: str, out: Path, *extra: str) -> Path:
    result = runner.invoke(app, ["prune", source, "-o", str(out), *extra])
    assert result.exit_code == 0, result.output
    return out


def _torch_report(path: Path, pattern: Pattern | None = None) -> dict[str, object]:
    ckpt = load_checkpoint(path, dense=False)
    nm = pattern or ckpt.meta.pattern or Pattern(2, 4)
    report = inspect_checkpoint(ckpt, nm, target=str(path))
    report.integrity = file_integrity(path)  # the file-only path also checks the recorded sha256
    return report.to_json()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("torch-free")
    out = {
        "mlp": _prune(py_source("tiny_mlp"), root / "mlp.safetensors"),
        "cnn": _prune(py_source("tiny_cnn"), root / "cnn.safetensors", "-p", "1:4"),
        "gpt2": _prune(f"hf:{tiny_gpt2_dir}", root / "gpt2.safetensors", "--keep-dense"),
    }
    # -0.0 at kept positions: valid, counted as zero for sparsity and compliance, reported.
    ckpt = load_checkpoint(out["mlp"])
    weight = ckpt.tensors["0.weight"]
    kept = ckpt.masks["0.weight"]
    rows = torch.arange(weight.shape[0]).unsqueeze(1)
    first_kept = kept.float().argmax(dim=1, keepdim=True)  # the first kept element of every row
    flipped = weight.clone()
    flipped[rows, first_kept] = -0.0
    ckpt.tensors["0.weight"] = flipped
    out["negzero"] = save_checkpoint(ckpt, root / "negzero.safetensors")
    # bfloat16: numpy has no such dtype; the file-only path reads its bits
    ckpt = load_checkpoint(out["mlp"])
    ckpt.tensors = {k: v.to(torch.bfloat16) for k, v in ckpt.tensors.items()}
    ckpt.dense = {}
    out["bf16"] = save_checkpoint(ckpt, root / "bf16.safetensors")
    return out


@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt2", "negzero", "bf16"])
@pytest.mark.parametrize("pattern", [None, "2:4", "1:8"])
def test_report_equals_the_torch_path(checkpoints: dict[str, Path], name: str, pattern: str | None) -> None:
    path = checkpoints[name]
    nm = parse_pattern(pattern) if pattern else None
    fast = run_inspect(str(path), pattern=nm).to_json()
    assert fast == _torch_report(path, nm)
    assert fast["layers"], "the checkpoint has pruned layers"
    # and against torch's own arithmetic (nmcli.formats.onnx_layout), an implementation independent of the bits
    ckpt = load_checkpoint(path, dense=False)
    for layer in fast["layers"]:
        values = ckpt.tensors[layer["param"]]
        sparsity, compliant = weight_compliance(values, nm or Pattern(2, 4), layer["axis"])
        assert layer["sparsity"] == pytest.approx(sparsity, abs=1e-6)
        assert layer["compliant"] is compliant and layer["negative_zeros"] == negative_zeros(values)


def test_hand_checked_negative_zeros(checkpoints: dict[str, Path]) -> None:
    plain = {x["param"]: x for x in run_inspect(str(checkpoints["mlp"])).to_json()["layers"]}
    report = run_inspect(str(checkpoints["negzero"])).to_json()
    layer = {x["param"]: x for x in report["layers"]}["0.weight"]
    rows, cols = layer["shape"]
    # one kept value per row became -0.0: it counts as zero (sparsity up by one per row) and is reported
    assert layer["negative_zeros"] == rows
    assert layer["sparsity"] == pytest.approx(plain["0.weight"]["sparsity"] + 1 / cols)
    assert layer["compliant"] is True and report["compliant"] is True
    assert plain["0.weight"]["negative_zeros"] == 0


def test_pattern_override_can_fail(checkpoints: dict[str, Path]) -> None:
    report = run_inspect(str(checkpoints["mlp"]), pattern="1:4")
    assert report.violations and not report.compliant
    result = runner.invoke(app, ["inspect", str(checkpoints["mlp"]), "-p", "1:4", "--strict"])
    assert result.exit_code == 1


def _corrupt(root: Path, mlp: Path, name: str, change: str) -> Path:
    """A copy of the MLP checkpoint with one defect, written byte-exact (save_checkpoint would refuse it)."""
    with CheckpointReader(mlp) as reader:
        payload = {k: reader.tensor(k) for k in reader.state_names}
        payload |= {MASK_PREFIX + k: reader.packed_mask(k) for k in reader.mask_names}
        metadata = dict(reader.raw_metadata)
    if change == "mask-breaks-pattern":
        payload[MASK_PREFIX + "0.weight"] = pack_mask(torch.ones(payload["0.weight"].shape, dtype=torch.bool))
    elif change == "mask-misshaped":
        payload[MASK_PREFIX + "2.weight"] = torch.zeros(3, dtype=torch.uint8)
    elif change == "negative-zero-where-pruned":
        weight = payload["0.weight"].clone()
        weight[weight == 0] = -0.0
        payload["0.weight"] = weight
    elif change == "nan":
        payload["0.bias"] = payload["0.bias"].clone()
        payload["0.bias"][0] = float("nan")
    elif change == "missing-mask":
        del payload[MASK_PREFIX + "0.weight"]
    path = root / f"{name}.safetensors"
    assert metadata["format"] == FORMAT
    write_safetensors({k: v.contiguous() for k, v in payload.items()}, path, metadata)
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("mask-breaks-pattern", r"layer 0\.weight: mask keeps more than 2 of 4 in \d+ group\(s\), breaking 2:4"),
        ("mask-misshaped", r"layer 2\.weight: packed mask has uint8 shape \(3,\), expected uint8 of \d+ bytes"),
        ("negative-zero-where-pruned", r"layer 0\.weight: \d+ effective weight\(s\) are non-zero \(or -0\.0\)"),
        ("nan", r"tensor 0\.bias holds NaN or infinite values"),
        ("missing-mask", r"layer 0\.weight: mask __nmcli__/mask/0\.weight is missing"),
    ],
)
def test_corrupt_checkpoint_same_problems(
    checkpoints: dict[str, Path], tmp_path: Path, change: str, message: str
) -> None:
    path = _corrupt(tmp_path, checkpoints["mlp"], change, change)
    with pytest.raises(CheckpointError, match=message) as fast:
        inspect_checkpoint_file(path)
    with pytest.raises(CheckpointError) as slow:
        load_checkpoint(path, dense=False)
    assert str(fast.value) == str(slow.value)
    result = runner.invoke(app, ["inspect", str(path), "--strict", "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"]["message"] == str(fast.value)


_NO_TORCH = """
import json, sys
from nmcli.commands.inspect import run_inspect
report = run_inspect(sys.argv[1]).to_json()
print(json.dumps({"torch": "torch" in sys.modules, "report": report}))
"""

_CLI_NO_TORCH = """
import sys
from nmcli.cli.app import main
try:
    main()
finally:
    sys.stderr.write("torch imported: %s\\n" % ("torch" in sys.modules))
"""


def test_inspect_of_a_checkpoint_does_not_import_torch(checkpoints: dict[str, Path]) -> None:
    for name in ("gpt2", "bf16"):
        path = checkpoints[name]
        proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(path)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["torch"] is False
        assert out["report"] == _torch_report(path)


def test_cli_strict_gate_does_not_import_torch(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    good = str(checkpoints["cnn"])
    bad = str(_corrupt(tmp_path, checkpoints["mlp"], "broken", "mask-breaks-pattern"))
    for target, code in ((good, 0), (bad, 2)):
        proc = subprocess.run(
            [sys.executable, "-c", _CLI_NO_TORCH, "inspect", target, "--strict", "--json"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == code, proc.stderr
        assert "torch imported: False" in proc.stderr
        if code == 0:
            assert json.loads(proc.stdout)["compliant"] is True
        else:
            assert "breaking 2:4" in json.loads(proc.stdout)["error"]["message"]

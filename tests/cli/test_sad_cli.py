"""``nmcli sad`` end to end: table, --json schema, several inputs, exit codes, --fail-above, --plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.commands.prune import run_prune
from nmcli.formats.open import load_checkpoint
from nmcli.nm.masks import nm_mask
from nmcli.nm.pattern import Pattern
from tests.conftest import py_source

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A pruned tiny MLP, and two dense snapshots drifting away from it (plain state dicts)."""
    from fixtures.models import tiny_mlp

    folder = tmp_path_factory.mktemp("sad")
    ckpt = folder / "mlp-2of4.safetensors"
    run_prune(py_source("tiny_mlp"), pattern="2:4", output=str(ckpt))
    model = tiny_mlp()
    paths = [ckpt]
    for step in (1, 2):
        with torch.no_grad():
            torch.manual_seed(step)
            for layer in (model[0], model[2]):
                layer.weight.add_(0.03 * torch.randn_like(layer.weight))
        path = folder / f"snap{step}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        paths.append(path)
    return paths


def _expected_sad(ckpt: Path, snapshot: Path) -> tuple[int, int]:
    from safetensors.torch import load_file

    masks = load_checkpoint(ckpt).masks
    state = load_file(str(snapshot))
    sad = sum(int((masks[p] ^ nm_mask(state[p], Pattern(2, 4), 1)).sum()) for p in masks)
    return sad, sum(m.numel() for m in masks.values())


def test_json_schema_for_two_inputs(trajectory: list[Path]) -> None:
    ckpt, snap = trajectory[0], trajectory[1]
    code, out, err = run("sad", str(ckpt), str(snap), "-p", "2:4", "--arch", py_source("tiny_mlp"), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert {"a", "b", "sad", "total", "normalized", "layers"} <= set(data)
    assert (data["a"], data["b"]) == (str(ckpt), str(snap))
    assert (data["sad"], data["total"]) == _expected_sad(ckpt, snap)
    assert data["sad"] > 0
    assert data["normalized"] == pytest.approx(data["sad"] / data["total"])
    assert [layer["param"] for layer in data["layers"]] == ["0.weight", "2.weight", "4.weight"]
    for layer in data["layers"]:
        assert set(layer) == {"param", "sad", "total", "normalized"}
        assert layer["normalized"] == pytest.approx(layer["sad"] / layer["total"])
    assert sum(layer["sad"] for layer in data["layers"]) == data["sad"]


def test_table_on_stderr_sorted_by_divergence(trajectory: list[Path]) -> None:
    code, out, err = run("sad", str(trajectory[0]), str(trajectory[2]), "-p", "2:4", "--arch", py_source("tiny_mlp"))
    assert code == 0, err
    assert out == ""
    data = json.loads(
        run("sad", str(trajectory[0]), str(trajectory[2]), "-p", "2:4", "--arch", py_source("tiny_mlp"), "--json")[1]
    )
    ranked = sorted(data["layers"], key=lambda x: -x["normalized"])
    positions = [err.index(layer["param"]) for layer in ranked]
    assert positions == sorted(positions)
    assert f"SAD {data['sad']:,} of {data['total']:,}" in err


def test_several_inputs_json(trajectory: list[Path]) -> None:
    a, b, c = (str(p) for p in trajectory)
    code, out, err = run("sad", a, b, c, "-p", "2:4", "--arch", py_source("tiny_mlp"), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["inputs"] == [a, b, c]
    assert [(r["a"], r["b"]) for r in data["pairs"]] == [(a, b), (b, c)]
    assert [(r["a"], r["b"]) for r in data["vs_first"]] == [(a, b), (a, c)]
    assert data["vs_first"][1]["sad"] == _expected_sad(trajectory[0], trajectory[2])[0]


def test_fail_above_exits_1_after_printing(trajectory: list[Path]) -> None:
    args = ["sad", str(trajectory[0]), str(trajectory[1]), "-p", "2:4", "--arch", py_source("tiny_mlp"), "--json"]
    code, out, err = run(*args, "--fail-above", "0")
    assert code == 1
    assert json.loads(out)["sad"] > 0  # the result is printed before the check fails
    assert "exceeds --fail-above" in err
    code, _, err = run(*args, "--fail-above", "1")
    assert code == 0, err


def test_mismatch_exits_2_naming_parameters(trajectory: list[Path], tmp_path: Path) -> None:
    state = load_checkpoint(trajectory[0]).tensors
    state["extra.weight"] = torch.zeros(3)
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(other))
    code, out, err = run("sad", str(trajectory[0]), str(other), "-p", "2:4", "--arch", py_source("tiny_mlp"))
    assert code == 2
    assert out == ""
    assert "extra.weight" in err and "Traceback" not in err


def test_missing_file_and_bad_pattern_exit_2(trajectory: list[Path], tmp_path: Path) -> None:
    code, _, err = run("sad", str(trajectory[0]), str(tmp_path / "nope.safetensors"))
    assert code == 2 and "does not exist" in err
    code, _, err = run("sad", str(trajectory[0]), str(trajectory[1]), "-p", "5:4")
    assert code == 2 and "5:4" in err
    code, _, err = run("sad", str(trajectory[0]))
    assert code == 2 and "two" in err


def test_plot_two_and_several(trajectory: list[Path], tmp_path: Path) -> None:
    arch = ["-p", "2:4", "--arch", py_source("tiny_mlp")]
    pair_png, seq_png = tmp_path / "pair.png", tmp_path / "seq.png"
    code, _, err = run("sad", str(trajectory[0]), str(trajectory[1]), *arch, "--plot", str(pair_png))
    assert code == 0, err
    assert pair_png.read_bytes()[:8] == PNG_MAGIC
    code, _, err = run("sad", *(str(p) for p in trajectory), *arch, "--plot", str(seq_png), "--json")
    assert code == 0, err
    assert seq_png.read_bytes()[:8] == PNG_MAGIC
    # an existing plot is not overwritten without --force
    before = pair_png.stat().st_mtime_ns
    code, _, err = run("sad", str(trajectory[0]), str(trajectory[1]), *arch, "--plot", str(pair_png))
    assert code == 2 and "--force" in err
    assert pair_png.stat().st_mtime_ns == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_plot_without_matplotlib_exits_3(trajectory: list[Path], tmp_path: Path) -> None:
    # A fresh interpreter where importing matplotlib fails, as on an install without the extra.
    script = (
        "import sys; sys.modules['matplotlib'] = None; from nmcli.cli.app import main; "
        f"sys.argv = ['nmcli', 'sad', {str(trajectory[0])!r}, {str(trajectory[0])!r}, '--plot', "
        f"{str(tmp_path / 'x.png')!r}]; main()"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert proc.returncode == 3, proc.stderr
    assert "pip install 'nmcli[plot]'" in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_console_script_identical_checkpoints(nmcli_exe: str, trajectory: list[Path]) -> None:
    proc = subprocess.run(
        [nmcli_exe, "sad", str(trajectory[0]), str(trajectory[0]), "--json", "--fail-above", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["sad"] == 0 and data["total"] == sum(m.numel() for m in load_checkpoint(trajectory[0]).masks.values())


def test_bad_input_messages_name_the_real_problem(trajectory: list[Path], tmp_path: Path) -> None:
    """Issue 11 item 8: a directory, --fail-above nan, --plot onto an input."""
    a, b = str(trajectory[0]), str(trajectory[0])
    code, _, err = run("sad", str(tmp_path), a)
    assert code == 2 and "is a directory" in err and "--pattern" not in err
    for bad in ("nan", "inf", "-0.5", "1.5"):
        code, out, err = run("sad", a, b, "--fail-above", bad)
        assert code == 2 and out == "" and "--fail-above" in err and "should be" not in err
    before = trajectory[0].read_bytes()
    code, _, err = run("sad", a, b, "--plot", a)
    assert code == 2 and "choose another --plot" in " ".join(err.split()) and "another -o" not in err
    assert trajectory[0].read_bytes() == before


def test_checkpoints_are_compared_without_importing_torch(trajectory: list[Path]) -> None:
    """Issue 11 item 12: sad of nmcli checkpoints reads the masks with numpy; torch is never imported."""
    a = str(trajectory[0])
    script = (
        "import atexit, sys\n"
        "atexit.register(lambda: sys.stderr.write('torch imported: %s\\n' % ('torch' in sys.modules)))\n"
        "from nmcli.cli.app import main\n"
        f"sys.argv = ['nmcli', 'sad', {a!r}, {a!r}, '--json']\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["sad"] == 0
    assert "torch imported: False" in proc.stderr

"""``nmcli finetune`` through the CLI: --json, exit codes, --log-every, and Ctrl-C then --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.commands.prune import run_prune
from nmcli.formats.open import load_checkpoint
from nmcli.formats.trainstate import trainstate_path
from tests.conftest import py_source

runner = CliRunner()


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[Path, Path]:
    pruned = tmp_path / "mlp-2of4.safetensors"
    run_prune(py_source("tiny_mlp"), pattern="2:4", keep_dense=True, output=pruned)
    gen = torch.Generator().manual_seed(0)
    data = tmp_path / "d.safetensors"
    save_file(
        {"inputs": torch.randn(32, 64, generator=gen), "targets": torch.randint(0, 10, (32,), generator=gen)}, str(data)
    )
    return pruned, data


def test_json_summary_and_default_output(setup: tuple[Path, Path]) -> None:
    pruned, data = setup
    result = runner.invoke(app, ["finetune", str(pruned), "--data", f"tensors:{data}", "--steps", "3",
                                 "--batch-size", "8", "--device", "cpu", "--log-every", "1", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(summary) >= {"output", "steps", "final_loss", "sad_vs_start", "seconds"}
    assert summary["steps"] == 3 and Path(summary["output"]) == pruned.with_name("mlp-2of4-ft.safetensors")
    assert "step 3/3 loss" in result.stderr
    assert load_checkpoint(summary["output"]).meta.history[-1]["metrics"]["steps"] == 3
    again = runner.invoke(
        app, ["finetune", str(pruned), "--data", f"tensors:{data}", "--steps", "1", "--batch-size", "8"]
    )
    assert again.exit_code == 2 and "--force" in again.stderr


def test_exit_codes(setup: tuple[Path, Path], tmp_path: Path) -> None:
    pruned, data = setup
    out = str(tmp_path / "o.safetensors")
    bad = runner.invoke(app, ["finetune", str(pruned), "--data", "csv:x", "-o", out])
    assert bad.exit_code == 2 and "unknown --data" in bad.stderr
    missing = runner.invoke(
        app, ["finetune", str(tmp_path / "nope.safetensors"), "--data", f"tensors:{data}", "-o", out]
    )
    assert missing.exit_code == 2
    images = runner.invoke(app, ["finetune", str(pruned), "--data", f"imagefolder:{tmp_path}", "-o", out])
    try:
        import torchvision  # noqa: F401
    except Exception:
        assert images.exit_code == 3 and "nmcli[vision]" in images.stderr
    if not torch.cuda.is_available():
        cuda = runner.invoke(app, ["finetune", str(pruned), "--data", f"tensors:{data}", "--device", "cuda", "-o", out])
        assert cuda.exit_code == 3 and "CUDA" in cuda.stderr
    assert "Traceback" not in bad.stderr + missing.stderr + images.stderr


def test_ctrl_c_saves_a_resumable_checkpoint(setup: tuple[Path, Path], tmp_path: Path) -> None:
    pruned, data = setup
    out = tmp_path / "run.safetensors"
    args = [sys.executable, "-m", "nmcli", "finetune", str(pruned), "--data", f"tensors:{data}", "--steps", "100000",
            "--batch-size", "8", "--device", "cpu", "--log-every", "1", "-o", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # wait until training runs
        if line.startswith("step 5/") or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert out.is_file() and trainstate_path(out).is_file()
    partial = load_checkpoint(out)
    done = partial.meta.history[-1]["metrics"]["steps"]
    assert done >= 5 and partial.dense
    # resume with a different --steps is refused; the same command continues
    resumed = runner.invoke(app, ["finetune", str(pruned), "--data", f"tensors:{data}", "--steps", str(done + 2),
                                  "--batch-size", "8", "--device", "cpu", "-o", str(out), "--resume", "--json"])  # fmt: skip
    assert resumed.exit_code == 2 and "--steps" in resumed.stderr


def test_off_a_terminal_plain_progress_lines_show_the_run_is_alive(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NMCLI_PROGRESS", "auto")
    pruned, data = setup
    out = str(tmp_path / "ft.safetensors")
    result = runner.invoke(app, ["finetune", str(pruned), "--data", f"tensors:{data}", "--steps", "3",
                                 "--batch-size", "8", "-o", out, "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("finetune: ")]
    assert lines[0].startswith("finetune: 1/3 steps, loss ") and lines[-1].startswith("finetune: 3/3 steps, loss ")
    assert all(line.endswith(")") for line in lines)
    json.loads(result.stdout)  # stdout stays the JSON object
    quiet = runner.invoke(app, ["-q", "finetune", str(pruned), "--data", f"tensors:{data}", "--steps", "1",
                                "--batch-size", "8", "-o", out, "--force"])  # fmt: skip
    assert quiet.exit_code == 0 and "finetune: " not in quiet.stderr


def test_shard_fsdp_in_one_process_says_it_ran_whole(setup: tuple[Path, Path], tmp_path: Path) -> None:
    pruned, data = setup
    out = str(tmp_path / "ft.safetensors")
    result = runner.invoke(app, ["finetune", str(pruned), "--data", f"tensors:{data}", "--steps", "1",
                                 "--batch-size", "8", "--shard", "fsdp", "-o", out, "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert any("--shard fsdp" in note and "torchrun" in note for note in json.loads(result.stdout)["notes"])

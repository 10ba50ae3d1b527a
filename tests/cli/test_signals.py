"""SIGTERM and SIGHUP are handled like Ctrl-C (issue 19): a real ``nmcli`` process gets the signal
mid-write; it exits 128 + the signal, leaves no temporary file and no output, and under --json
prints the JSON error object. finetune stops at a step boundary and saves its resumable state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nmcli.formats.open import load_checkpoint
from nmcli.formats.trainstate import trainstate_path
from tests.conftest import py_source


def _temps(folder: Path, name: str) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith((f".{name}.", f"{name}.tmp-")) and "probe" not in n]


def _signal_mid_write(nmcli_exe: str, args: list[str], out: Path, signum: int) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(
        [nmcli_exe, *args, "-o", str(out), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while not _temps(out.parent, out.name):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"no temporary output appeared before the command ended: {stderr[-2000:]}")
        time.sleep(0.005)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_prune_file_output(workdir: Path, nmcli_exe: str, minilm_dir: Path, signum: int, code: int) -> None:
    before = sorted(p.name for p in minilm_dir.iterdir())
    out = workdir / "minilm.safetensors"
    done = _signal_mid_write(nmcli_exe, ["prune", f"hf:{minilm_dir}"], out, signum)
    assert done.returncode == code, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["code"] == code and error["type"] == "Interrupted"
    assert done.stderr.strip().splitlines()[-1] == f"interrupted by {signal.Signals(signum).name}"
    assert os.listdir(workdir) == [] and sorted(p.name for p in minilm_dir.iterdir()) == before


def test_sharded_prune_directory_output(workdir: Path, nmcli_exe: str, minilm_dir: Path) -> None:
    out = workdir / "outdir"
    done = _signal_mid_write(nmcli_exe, ["prune", str(minilm_dir)], out, signal.SIGTERM)
    assert done.returncode == 143, done.stderr
    assert os.listdir(workdir) == []


def test_finetune_saves_resumable_state_on_sigterm(workdir: Path, nmcli_exe: str) -> None:
    assert subprocess.run([nmcli_exe, "prune", py_source("tiny_cnn"), "-o", "cnn.safetensors"]).returncode == 0
    torch.manual_seed(0)
    save_file({"inputs": torch.randn(64, 3, 8, 8), "targets": torch.randint(0, 10, (64,))}, "data.safetensors")
    args = ["finetune", "cnn.safetensors", "--data", "tensors:data.safetensors", "--batch-size", "4"]
    proc = subprocess.Popen(
        [nmcli_exe, *args, "--steps", "100000", "--log-every", "1", "-o", "ft.safetensors", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # training has started once a step is logged
        if "step" in line:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143
    report = json.loads(stdout)
    assert report["interrupted"] is True and 0 < report["steps"] < 100000
    saved = load_checkpoint(workdir / "ft.safetensors")
    assert saved.meta.history[-1]["metrics"]["partial"] is True
    assert trainstate_path(workdir / "ft.safetensors").is_file()
    assert not [n for n in os.listdir(workdir) if n.endswith(".tmp")]

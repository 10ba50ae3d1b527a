"""The same calibrated prune gives the same masks and weights with 1 or 2 torch threads, to a file or
a directory, and the same file bytes run to run with SOURCE_DATE_EPOCH (issue 24), on a really
trained tiny byte-level Llama."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("transformers")
    from fixtures.tinylm import byte_batches, train_tiny_llama

    root = tmp_path_factory.mktemp("tinylm")
    folder = train_tiny_llama(root / "llama", steps=200)
    calib = root / "calib.safetensors"
    save_file({"input_ids": byte_batches(32, 64)}, str(calib))
    return folder, calib


def _prune(exe: str, folder: Path, calib: Path, out: Path, threads: int, method: str) -> dict[str, torch.Tensor]:
    """``nmcli prune`` in a fresh process (MKL starts as the console script starts it) on ``threads`` threads."""
    args = [exe, "prune", f"hf:{folder}", "--method", method, "--calib", f"tensors:{calib}", "-o", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["SOURCE_DATE_EPOCH"] = "1765000000"  # the history's time: reproducible outputs
    env.pop("MKL_CBWR", None)
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    stored = (
        load_file(str(out))
        if out.suffix
        else {**load_file(str(out / "model.safetensors")), **load_file(str(out / "nmcli.safetensors"))}
    )
    masks = {k.rpartition("/mask/")[2]: v for k, v in stored.items() if "/mask/" in k}
    return {**{f"mask:{k}": v for k, v in masks.items()}, **{k: stored[k] for k in masks}}


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_threads_and_output_forms_give_the_same_masks_and_weights(
    trained_llama: tuple[Path, Path], tmp_path: Path, method: str, nmcli_exe: str
) -> None:
    folder, calib = trained_llama
    runs = {
        "file, 1 thread": _prune(nmcli_exe, folder, calib, tmp_path / "one.safetensors", 1, method),
        "file, 2 threads": _prune(nmcli_exe, folder, calib, tmp_path / "two.safetensors", 2, method),
        "directory, 2 threads": _prune(nmcli_exe, folder, calib, tmp_path / "dir", 2, method),
        "file, 2 threads again": _prune(nmcli_exe, folder, calib, tmp_path / "again.safetensors", 2, method),
    }
    # the same command twice writes the same bytes (SOURCE_DATE_EPOCH fixes the history's time)
    assert (tmp_path / "two.safetensors").read_bytes() == (tmp_path / "again.safetensors").read_bytes()
    reference = runs["file, 1 thread"]
    assert len(reference) == 2 * 15
    for name, tensors in runs.items():
        assert tensors.keys() == reference.keys(), name
        differ = [k for k in reference if not torch.equal(tensors[k], reference[k])]
        assert not differ, f"{name}: {differ[:3]}"

"""The README's two set-up commands are exactly what .ci/run runs, and the quickstart works."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from nmcli.formats.open import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _readme_setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Set-up section has one bash block"
    return [line.strip() for line in blocks[0].splitlines() if line.strip() and not line.startswith("#")]


def _ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.startswith("# README set-up command"):
            found.append(lines[i + 1].strip())
    return found


def test_readme_has_exactly_two_setup_commands_and_ci_runs_them() -> None:
    readme = _readme_setup_commands()
    assert len(readme) == 2
    assert readme == _ci_commands()
    assert "examples/quickstart.sh" in readme[0] and "pytest" in readme[1] and "[dev]" in readme[1]


def test_ci_installs_torch_first_and_fails_on_errors() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in script
    assert script.index("torch==2.13.0") < script.index(_ci_commands()[0])


@pytest.mark.usefixtures("nmcli_exe")
def test_quickstart_runs(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "quickstart.sh")],
        cwd=tmp_path,
        env={**os.environ, "QUICKSTART_OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    ckpt = load_checkpoint(out / "small_cnn-2of4.safetensors")
    assert str(ckpt.pattern) == "2:4" and len(ckpt.masks) == 4 and set(ckpt.dense) == set(ckpt.masks)
    assert "4 of 4 eligible layers are 2:4" in proc.stderr

"""Trust comes from the person running nmcli, never from a file (issue 19, DESIGN.md section 7).

An attacker ships a checkpoint whose recorded source is their own code beside it: a pickle whose
``__reduce__`` runs a command, a ``py:arch.py:build`` file that runs on import, a dotted
``py:evil:build`` module in the current folder, or an ``arch`` field naming either; old files also
say ``"trusted": true``. Every command that rebuilds the architecture must refuse (exit 2, one line
naming ``--trust``) without running any of it; ``--trust`` on the command line runs it; the
quickstart chain ``prune py:FILE.py:factory; export`` still needs no flag (the per-user trust
store); an edited source is refused again.

Each attack's code writes a marker file: the test asserts it was never written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.commands.prune import run_prune
from nmcli.formats.checkpoint import SourceRef, save_checkpoint
from nmcli.formats.open import load_checkpoint
from nmcli.formats.safetensors import sha256_file
from nmcli.trust import is_trusted, store_path

LEGIT = """
from torch import nn


def build():
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
"""

ATTACKS = ["pickle", "pickle-trusted-flag", "py-file", "py-dotted", "arch-py", "arch-pickle"]
FAST_BENCH = ("--iters", "2", "--warmup", "1", "--device", "cpu", "--backend", "torch")


class _Payload:
    """A pickle whose ``__reduce__`` writes the marker, then returns a model that fits the checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        nn = "__import__('torch').nn"
        return (
            eval,
            (
                f"(__import__('pathlib').Path({str(self.marker)!r}).write_text('ran'), "
                f"{nn}.Sequential({nn}.Linear(16, 16), {nn}.ReLU(), {nn}.Linear(16, 8)))[1]",
            ),
        )


def _evil_source(marker: Path) -> str:
    return LEGIT + f"\nimport pathlib\n\npathlib.Path({str(marker)!r}).write_text('ran')\n"


def _set_trusted_flag(path: Path) -> None:
    """Rewrite the checkpoint's metadata as an old writer (or an attacker) would: ``"trusted": true``."""
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - safe_open has no iteration
    meta = json.loads(metadata["nmcli"])
    meta["source"]["trusted"] = True
    metadata["nmcli"] = json.dumps(meta)
    save_file(tensors, str(path), metadata=metadata)


def make_attack(folder: Path, kind: str) -> tuple[Path, Path]:
    """An attacker's folder: ``model.safetensors`` whose recorded source is ``kind``, and its code.

    Returns:
        The checkpoint, and the marker file that the attacker's code writes when it runs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "PWNED"
    legit = folder / "legit.py"
    legit.write_text(LEGIT)
    ckpt_path = folder / "model.safetensors"
    run_prune(f"py:{legit}:build", pattern="2:4", input_shape="1x16", output=ckpt_path, force=True)
    legit.unlink()
    helper = folder / "helper.pt"
    torch.save(_Payload(marker), helper)
    evil = folder / "evil.py"
    evil.write_text(_evil_source(marker))
    ref = {
        "pickle": SourceRef(spec=str(helper), sha256=sha256_file(helper)),
        "pickle-trusted-flag": SourceRef(spec=str(helper), sha256=sha256_file(helper)),
        "py-file": SourceRef(spec=f"py:{evil}:build", sha256=sha256_file(evil)),
        "py-dotted": SourceRef(spec="py:evil:build", sha256=sha256_file(evil)),
        "arch-py": SourceRef(spec=str(ckpt_path), arch=f"py:{evil}:build"),
        "arch-pickle": SourceRef(spec=str(ckpt_path), arch=str(helper)),
    }[kind]
    ckpt = load_checkpoint(ckpt_path)
    ckpt.meta = replace(ckpt.meta, source=ref)
    save_checkpoint(ckpt, ckpt_path, force=True)
    if kind == "pickle-trusted-flag":
        _set_trusted_flag(ckpt_path)
    return ckpt_path, marker


@pytest.fixture()
def empty_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty trust store of this test's own; the current folder is the attacker's."""
    home = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    attack = tmp_path / "attack"
    attack.mkdir()
    monkeypatch.chdir(attack)  # the user cd'ed into the downloaded folder: py:evil:build resolves here
    return home


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _assert_refused(code: int, err: str, marker: Path) -> None:
    assert not marker.exists(), "the attacker's code ran"
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "--trust" in err and "--arch" in err and "say-so" in err, err


def _commands(ckpt: Path, folder: Path) -> dict[str, list[str]]:
    data = folder / "data.safetensors"
    if not data.exists():
        save_file({"inputs": torch.randn(8, 16), "targets": torch.randint(0, 8, (8,))}, str(data))
    return {
        "export": ["export", str(ckpt), "-o", str(folder / "out.onnx")],
        "bench": ["bench", str(ckpt), *FAST_BENCH],
        "finetune": ["finetune", str(ckpt), "--data", f"tensors:{data}", "--steps", "1", "-o", str(folder / "ft.st")],
        "inspect": ["inspect", str(ckpt), "--rebuild"],
        "prune": ["prune", str(ckpt), "-p", "1:4", "-o", str(folder / "again.safetensors")],
    }


@pytest.mark.parametrize("kind", ATTACKS)
@pytest.mark.parametrize("command", ["export", "bench", "finetune", "inspect", "prune"])
def test_a_recorded_source_never_runs_without_trust(empty_store: Path, tmp_path: Path, kind: str, command: str) -> None:
    ckpt, marker = make_attack(tmp_path / "attack", kind)
    code, _, err = run(*_commands(ckpt, tmp_path)[command])
    _assert_refused(code, err, marker)
    assert repr(str(tmp_path / "attack" / "helper.pt")) in err or "evil" in err, err  # names the recorded source
    assert not store_path().exists() or not is_trusted(tmp_path / "attack" / "evil.py")


@pytest.mark.parametrize("kind", ATTACKS)
def test_sad_reads_stored_masks_and_runs_no_recorded_source(empty_store: Path, tmp_path: Path, kind: str) -> None:
    ckpt, marker = make_attack(tmp_path / "attack", kind)
    code, _, err = run("sad", str(ckpt), str(ckpt), "--json")
    assert code == 0, err
    assert not marker.exists()


@pytest.mark.parametrize("kind", ATTACKS)
def test_trust_on_the_command_line_runs_it(empty_store: Path, tmp_path: Path, kind: str) -> None:
    ckpt, marker = make_attack(tmp_path / "attack", kind)
    code, _, err = run("inspect", str(ckpt), "--rebuild", "--trust", "--json")
    assert code == 0, err
    assert marker.exists()
    marker.unlink()  # --trust is for this run: the recorded source is not remembered
    code, _, err = run("inspect", str(ckpt), "--rebuild")
    _assert_refused(code, err, marker)


def test_arch_on_the_command_line_rebuilds_without_running_the_record(empty_store: Path, tmp_path: Path) -> None:
    ckpt, marker = make_attack(tmp_path / "attack", "pickle")
    mine = tmp_path / "mine.py"
    mine.write_text(LEGIT)
    code, _, err = run("inspect", str(ckpt), "--rebuild", "--arch", f"py:{mine}:build", "--json")
    assert code == 0, err
    assert not marker.exists()
    assert is_trusted(mine)  # named by the user: remembered


def test_old_trusted_flag_is_not_written_and_gains_nothing(empty_store: Path, tmp_path: Path) -> None:
    ckpt, _ = make_attack(tmp_path / "attack", "pickle-trusted-flag")
    with safe_open(str(ckpt), "pt") as handle:
        assert json.loads(handle.metadata()["nmcli"])["source"]["trusted"] is True
    assert "trusted" not in SourceRef(spec="x.pt").to_json()
    assert not hasattr(load_checkpoint(ckpt).meta.source, "trusted")


def test_console_script_refuses_the_attack(empty_store: Path, tmp_path: Path, nmcli_exe: str) -> None:
    """The real ``nmcli`` process, for export and a dotted py: module in the current folder."""
    for kind in ("pickle-trusted-flag", "py-dotted"):
        folder = tmp_path / f"attack-{kind}"
        ckpt, marker = make_attack(folder, kind)
        out = folder / "out.onnx"
        proc = subprocess.run(
            [nmcli_exe, "export", str(ckpt), "-o", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=folder,
            env=dict(os.environ),
        )
        _assert_refused(proc.returncode, proc.stderr, marker)
        assert not out.exists()


def test_console_script_trust_runs_it(empty_store: Path, tmp_path: Path, nmcli_exe: str) -> None:
    ckpt, marker = make_attack(tmp_path / "attack", "pickle")
    proc = subprocess.run(
        [nmcli_exe, "export", str(ckpt), "--trust", "--no-verify", "-o", str(tmp_path / "out.onnx")],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert marker.exists(), proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.onnx").is_file()


def test_quickstart_chain_needs_no_flag_and_an_edited_source_is_refused(
    empty_store: Path, tmp_path: Path, nmcli_exe: str
) -> None:
    """``prune py:FILE.py:factory -o x; export x``: the prune remembers FILE.py, the export trusts it;
    after FILE.py changes, the export refuses until the user names it (or passes --trust) again."""
    arch = tmp_path / "arch.py"
    marker = tmp_path / "IMPORTED"
    arch.write_text(LEGIT + f"\nimport pathlib\n\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    pruned = tmp_path / "x.safetensors"
    env = dict(os.environ)

    def nmcli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([nmcli_exe, *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)

    proc = nmcli("prune", f"py:{arch}:build", "--input-shape", "1x16", "-o", str(pruned))
    assert proc.returncode == 0, proc.stderr
    assert store_path() == empty_store / "nmcli" / "trusted" and is_trusted(arch)
    assert (store_path().stat().st_mode & 0o777) == 0o600
    assert (store_path().parent.stat().st_mode & 0o777) == 0o700
    marker.unlink()
    proc = nmcli("export", str(pruned), "--no-verify", "-o", str(tmp_path / "x.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert marker.exists()  # the user's own code, trusted by the store
    marker.unlink()

    arch.write_text(arch.read_text() + "\n# edited\n")
    proc = nmcli("export", str(pruned), "--no-verify", "-o", str(tmp_path / "y.onnx"), "--force")
    _assert_refused(proc.returncode, proc.stderr, marker)
    assert not (tmp_path / "y.onnx").exists()


def test_store_location_honours_xdg_config_home(empty_store: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine.py"
    mine.write_text(LEGIT)
    code, _, err = run("inspect", f"py:{mine}:build", "--json")
    assert code == 0, err
    line = (empty_store / "nmcli" / "trusted").read_text().strip()
    assert line == f"{sha256_file(mine)}  {mine}"


def test_an_unwritable_store_does_not_fail_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(blocker))
    mine = tmp_path / "mine.py"
    mine.write_text(LEGIT)
    code, _, err = run("prune", f"py:{mine}:build", "--input-shape", "1x16", "-o", str(tmp_path / "m.safetensors"))
    assert code == 0, err
    assert not is_trusted(mine)


def test_a_trusted_dotted_module_rebuilds_from_the_store(empty_store: Path, tmp_path: Path) -> None:
    """``py:pkg.arch:build`` named by the user (cwd on the import path): later rebuilds trust it."""
    pkg = tmp_path / "attack" / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "arch.py").write_text(LEGIT)
    pruned = tmp_path / "p.safetensors"
    code, _, err = run("prune", "py:mypkg.arch:build", "--input-shape", "1x16", "-o", str(pruned))
    assert code == 0, err
    sys.modules.pop("mypkg.arch", None)
    sys.modules.pop("mypkg", None)
    code, _, err = run("inspect", str(pruned), "--rebuild", "--json")
    assert code == 0, err
    (pkg / "__init__.py").write_text("x = 1\n")  # a package __init__ runs on import too: it must be trusted
    sys.modules.pop("mypkg.arch", None)
    sys.modules.pop("mypkg", None)
    code, _, err = run("inspect", str(pruned), "--rebuild")
    assert code == 2 and "--trust" in err, err

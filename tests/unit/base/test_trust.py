"""The per-user trust store and the no-import resolution of ``py:`` sources (nmcli.trust).

``nmcli.trust`` imports neither torch nor user code; resolving ``py:package.module`` to its files
must not import the package (``importlib.util.find_spec("a.b")`` would run ``a/__init__.py``).
"""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nmcli.trust import (
    file_sha256,
    is_trusted,
    module_files,
    remember,
    remember_command_line,
    spec_files,
    spec_trusted,
    store_path,
)

RUNS = "import pathlib\npathlib.Path({marker!r}).write_text('imported')\n"


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty store of this test's own; returns the store file's path."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config" / "nmcli" / "trusted"


def _code(tmp_path: Path, name: str = "arch.py", text: str = "def build():\n    return 1\n") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_store_location_follows_xdg_config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert store_path() == tmp_path / "cfg" / "nmcli" / "trusted"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert store_path() == tmp_path / "home" / ".config" / "nmcli" / "trusted"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")  # the XDG spec: relative paths are ignored
    assert store_path() == tmp_path / "home" / ".config" / "nmcli" / "trusted"


def test_the_session_store_is_not_the_users(tmp_path: Path) -> None:
    """tests/conftest.py points the whole session at a temporary store."""
    real = Path.home() / ".config" / "nmcli" / "trusted"
    assert store_path() != real
    assert os.environ["XDG_CONFIG_HOME"] != str(Path.home() / ".config")


def test_remember_then_trusted_until_the_file_changes(store: Path, tmp_path: Path) -> None:
    code = _code(tmp_path)
    assert not is_trusted(code)
    assert remember(code) and is_trusted(code)
    assert store.read_text() == f"{file_sha256(code)}  {code}\n"
    assert (store.stat().st_mode & 0o777) == 0o600 and (store.parent.stat().st_mode & 0o777) == 0o700
    assert remember(code) and store.read_text().count("\n") == 1  # no duplicates
    code.write_text(code.read_text() + "# edited\n")
    assert not is_trusted(code)
    other = _code(tmp_path, "other.py", "x = 2\n")
    assert remember(other) and remember(code)
    assert is_trusted(code) and is_trusted(other) and len(store.read_text().splitlines()) == 3
    assert not list(store.parent.glob(".trusted.*.tmp"))  # written through a temp file, renamed


def test_missing_garbled_or_foreign_writable_store_is_empty(store: Path, tmp_path: Path) -> None:
    code = _code(tmp_path)
    assert not is_trusted(code)  # missing
    store.parent.mkdir(parents=True)
    store.write_bytes(b"\xff\xfe garbage\nnot-a-sha  x\n" + file_sha256(code).upper().encode() + b"  x\n")
    store.chmod(0o600)
    assert not is_trusted(code)  # garbled lines count for nothing
    store.write_text(f"{file_sha256(code)}  {code}\n")
    assert is_trusted(code)
    store.chmod(0o666)  # others may write it: its entries count for nothing
    assert not is_trusted(code)
    assert remember(code) and (store.stat().st_mode & 0o777) == 0o600 and is_trusted(code)


def test_remember_never_raises_on_an_unwritable_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = _code(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(blocker))  # the store's folder cannot be made
    assert remember(code) is False and not is_trusted(code)
    assert remember(tmp_path / "missing.py") is False
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        readonly = tmp_path / "ro"
        (readonly / "nmcli").mkdir(parents=True)
        (readonly / "nmcli").chmod(0o500)
        monkeypatch.setenv("XDG_CONFIG_HOME", str(readonly))
        try:
            assert remember(code) is False
        finally:
            (readonly / "nmcli").chmod(0o700)


def test_dotted_module_resolves_without_importing(tmp_path: Path) -> None:
    marker = tmp_path / "IMPORTED"
    pkg = tmp_path / "trustpkg_a"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text(RUNS.format(marker=str(marker)))
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "models.py").write_text("def build():\n    return 1\n")
    files = module_files("trustpkg_a.sub.models", [tmp_path])
    assert files == [pkg / "__init__.py", pkg / "sub" / "__init__.py", pkg / "sub" / "models.py"]
    assert not marker.exists() and "trustpkg_a" not in sys.modules


def test_dotted_module_search_order_and_what_cannot_be_checked(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (second / "trustmod_b.py").write_text("")
    (first / "trustmod_b").mkdir()  # a namespace portion: a regular module later on the path wins
    assert module_files("trustmod_b", [first, second]) == [second / "trustmod_b.py"]
    (first / "trustmod_b.py").write_text("")  # a module beats the namespace folder beside it
    assert module_files("trustmod_b", [first, second]) == [first / "trustmod_b.py"]
    (first / f"trustmod_b{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_text("")
    assert module_files("trustmod_b", [first, second]) is None  # compiled: nothing to hash
    (second / "trustmod_c.pyc").write_bytes(b"")
    assert module_files("trustmod_c", [first, second]) is None  # bytecode only
    assert module_files("trustmod_missing", [first, second]) is None
    assert module_files("bad-name", [first]) is None and module_files("", [first]) is None
    (first / "nspkg").mkdir()
    assert module_files("nspkg", [first]) is None  # a namespace package holds no factory
    zipped = tmp_path / "mods.zip"
    zipped.write_bytes(b"PK")
    assert module_files("trustmod_b", [zipped, second]) is None  # a zip archive first: unverifiable


def test_an_imported_module_must_be_the_file_found(tmp_path: Path) -> None:
    (tmp_path / "json.py").write_text("")  # json is imported from the stdlib, not this file
    assert module_files("json", [tmp_path]) is None
    assert "json" in sys.modules


def test_find_spec_would_have_imported_the_package(tmp_path: Path) -> None:
    """Why module_files walks the path itself: importlib.util.find_spec runs the parent package."""
    marker = tmp_path / "IMPORTED"
    pkg = tmp_path / "trustpkg_d"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(RUNS.format(marker=str(marker)))
    (pkg / "m.py").write_text("")
    probe = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); from nmcli.trust import module_files; "
        "print(module_files('trustpkg_d.m') is not None)"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "True", proc.stderr
    assert not marker.exists()
    probe = (
        f"import sys, importlib.util; sys.path.insert(0, {str(tmp_path)!r}); importlib.util.find_spec('trustpkg_d.m')"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)
    assert marker.exists()


def test_spec_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = _code(tmp_path)
    assert spec_files("hf:some/model") == [] and spec_files("torchvision:resnet18") == []
    assert spec_files("timm:resnet18") == []
    assert spec_files(f"py:{code}:build") == [code]
    assert spec_files("py:arch:build") == [tmp_path / "arch.py"]  # the current folder is on the import path
    assert spec_files(f"py:{tmp_path / 'missing.py'}:build") is None
    assert spec_files(str(code)) == [code]
    assert spec_files(str(tmp_path / "nope.pt")) is None


def test_remember_command_line(store: Path, tmp_path: Path) -> None:
    code = _code(tmp_path)
    pickled = _code(tmp_path, "helper.pt", "not really a pickle")
    weights = _code(tmp_path, "w.safetensors", "")
    remember_command_line([f"py:{code}:build", str(pickled), str(weights), None, "hf:x"], trust=False)
    assert is_trusted(code) and not is_trusted(pickled) and not is_trusted(weights)
    remember_command_line([str(pickled), str(weights)], trust=True)
    assert is_trusted(pickled) and not is_trusted(weights)  # a .safetensors never runs code
    assert spec_trusted(f"py:{code}:build") and spec_trusted("hf:x")
    assert not spec_trusted(f"py:{tmp_path / 'missing.py'}:build")


def test_trust_module_imports_no_torch() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, nmcli.trust; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip() == "False", proc.stderr

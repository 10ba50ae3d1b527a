"""Property-based fuzzing of the file names a shard index holds (issue 19, DESIGN.md section 7).

Generated ``model.safetensors.index.json`` entries (``..``, absolute paths, separators, NUL and
control characters, unicode, lone surrogates, very long names, JSON non-strings) and shards
replaced on disk by a symlink out, ``/dev/null``, a FIFO or a folder: ``prune DIR -o OUT``,
``inspect``, ``sad`` and ``export --compress`` of a sharded output all exit 2 with one error line,
write nothing and change no file (inputs, a bystander beside them, ``/etc/passwd``).

The default run is small (40 cases, in-process); ``pytest -m slow tests/cli/test_fuzz_index.py``
runs 1,000.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (dev extra)")
transformers = pytest.importorskip("transformers")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from nmcli.cli.app import app  # noqa: E402
from nmcli.formats.sharded import INDEX  # noqa: E402
from tests.cli.test_paths_from_files import SHARD, Tree, assert_refused  # noqa: E402

DEFAULT_CASES = 40
SLOW_CASES = 1_000
_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    "database": None,
}


@pytest.fixture(scope="module")
def models(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny GPT-2 in 20 kB shards (``hf``) and its sharded nmcli output (``nmcli``)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir))
    folder = tmp_path_factory.mktemp("fuzz-index")
    model.save_pretrained(folder / "hf", max_shard_size="20KB")
    result = CliRunner().invoke(app, ["prune", str(folder / "hf"), "-o", str(folder / "nmcli")])
    assert result.exit_code == 0, result.stderr
    return {"hf": folder / "hf", "nmcli": folder / "nmcli"}


_PIECES = st.sampled_from(
    ["..", ".", "/", "\\", "bystander", SHARD, "etc", "passwd", "\x00", "\n", "\x7f", "é", "名", "\ud800", "C:", "~"]
)
_RELATIVE = st.lists(
    st.sampled_from(["..", ".", "bystander", "model", "out", SHARD, "", "etc"]), min_size=2, max_size=5
)
_NAMES = st.one_of(
    st.lists(_PIECES, min_size=1, max_size=6).map("".join),
    _RELATIVE.map("/".join),
    _RELATIVE.map("\\".join),
    st.text(max_size=24),
    st.integers(240, 700).map(lambda n: "x" * (n - len(".safetensors")) + ".safetensors"),
    st.integers(60, 200).map(lambda n: "é" * n),
    st.sampled_from([("abs", f"model/{SHARD}"), ("abs", f"bystander/{SHARD}"), ("abs", "out"), ("abs", "/etc/passwd")]),
    st.one_of(st.none(), st.integers(), st.booleans(), st.lists(st.integers(), max_size=2)),
)
_ON_DISK = st.sampled_from(["link-out", "link-dev", "fifo", "folder", "link-dir"])
_ENTRIES = st.one_of(_NAMES.map(lambda n: ("name", n)), _ON_DISK.map(lambda k: (k, None)))
_COMMANDS = st.sampled_from(["prune", "inspect", "sad", "export"])


def _resolve(root: Path, name: Any) -> Any:
    if isinstance(name, tuple):  # an absolute path, made under this case's folder
        return name[1] if name[1].startswith("/") else str(root / name[1])
    return name


def _attack(root: Path, entry: tuple[str, Any]) -> None:
    """Edit ``root/model`` (its index, or the attacked shard on disk)."""
    model = root / "model"
    kind, name = entry
    if kind == "name":
        index = model / INDEX
        data = json.loads(index.read_text())
        data["weight_map"] = {k: (_resolve(root, name) if v == SHARD else v) for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))
        return
    shard = model / SHARD
    shard.unlink()
    if kind == "link-out":
        shard.symlink_to(root / "bystander" / SHARD)
    elif kind == "link-dev":
        shard.symlink_to("/dev/null")
    elif kind == "fifo":
        os.mkfifo(shard)
    elif kind == "folder":
        shard.mkdir()
    else:
        shard.symlink_to(root / "bystander")


def _fuzz(models: dict[str, Path], command: str, entry: tuple[str, Any]) -> None:
    if entry[0] == "name":
        name = entry[1]
        assume(not (isinstance(name, str) and name in os.listdir(models["hf"])))  # an existing file is no attack
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = models["hf"] if command == "prune" else models["nmcli"]
        shutil.copytree(source, root / "model")
        (root / "bystander").mkdir()
        shutil.copy2(source / SHARD, root / "bystander" / SHARD)
        _attack(root, entry)
        tree = Tree(root)
        model, out = str(root / "model"), root / "out"
        args = {
            "prune": ["prune", model, "-o", str(out)],
            "inspect": ["inspect", model, "--strict"],
            "sad": ["sad", model, model],
            "export": ["export", model, "--compress", "-o", str(out)],
        }[command]
        result = CliRunner().invoke(app, args)
        assert_refused(result.exit_code, result.stderr, names=[], out=out, tree=tree)
        line = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
        assert INDEX in line or SHARD in line or "does not exist" in line, line


def _property(cases: int) -> Any:
    @settings(max_examples=cases, **_SETTINGS)
    @given(command=_COMMANDS, entry=_ENTRIES)
    def prop(models: dict[str, Path], command: str, entry: tuple[str, Any]) -> None:
        _fuzz(models, command, entry)

    return prop


_DEFAULT = _property(DEFAULT_CASES)
_SLOW = _property(SLOW_CASES)


def test_fuzz_index(models: dict[str, Path]) -> None:
    _DEFAULT(models)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fuzz_index_slow(models: dict[str, Path]) -> None:
    _SLOW(models)


def test_fuzz_harness_catches_a_changed_bystander(tmp_path: Path) -> None:
    """The checker is not vacuous: a changed file beside the input is caught."""
    (tmp_path / "bystander").mkdir()
    (tmp_path / "bystander" / SHARD).write_bytes(b"before")
    tree = Tree(tmp_path)
    (tmp_path / "bystander" / SHARD).write_bytes(b"after")
    with pytest.raises(AssertionError, match="changed"):
        tree.assert_unchanged()
    (tmp_path / "bystander" / "new").write_bytes(b"")
    with pytest.raises(AssertionError, match="wrote"):
        tree.assert_unchanged()

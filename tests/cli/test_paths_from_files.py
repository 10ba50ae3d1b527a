"""Names read from files stay inside their directory (issue 19, DESIGN.md section 7).

A shard index, a sidecar's metadata or an ONNX model's external data that names a file outside
its directory (``..``, an absolute path, a symlink out, a FIFO, a device) is exit 2 with one line
naming the file and the entry, before anything is opened or written: the output does not exist,
no temporary file is left, and no file anywhere in the test's folder (inputs, a bystander) changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nmcli.cli.app import app
from nmcli.errors import InputError
from nmcli.formats.sharded import INDEX, SIDECAR, ShardedModel
from nmcli.member import check_onnx_external_data, member_path, name_problem

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
SHARD = "model-00002-of-00008.safetensors"  # the shard every case attacks


# --------------------------------------------------------------------------------------------
# Fixtures: the tiny GPT-2 in 20 kB shards, and its sharded nmcli output


@pytest.fixture(scope="module")
def shards(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir))
    out = tmp_path_factory.mktemp("paths") / "gpt2-sharded"
    model.save_pretrained(out, max_shard_size="20KB")
    assert (out / SHARD).is_file()
    return out


@pytest.fixture(scope="module")
def pruned(shards: Path) -> Path:
    out = shards.parent / "gpt2-2of4"
    result = CliRunner().invoke(app, ["prune", str(shards), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert (out / SIDECAR).is_file() and (out / SHARD).is_file()
    return out


@pytest.fixture()
def case(tmp_path: Path, shards: Path) -> Path:
    """``tmp/model`` (a copy of the shards) beside ``tmp/bystander`` (a copy of the attacked shard)."""
    shutil.copytree(shards, tmp_path / "model")
    (tmp_path / "bystander").mkdir()
    shutil.copy2(shards / SHARD, tmp_path / "bystander" / SHARD)
    return tmp_path


@pytest.fixture()
def pruned_case(tmp_path: Path, pruned: Path) -> Path:
    """``tmp/model``: a copy of the sharded nmcli output, beside ``tmp/bystander``."""
    shutil.copytree(pruned, tmp_path / "model")
    (tmp_path / "bystander").mkdir()
    shutil.copy2(pruned / SHARD, tmp_path / "bystander" / SHARD)
    return tmp_path


# --------------------------------------------------------------------------------------------
# Helpers: edits, the snapshot of every file, the invariant


def remap(index: Path, name: str, *, shard: str = SHARD) -> None:
    """Point every ``weight_map`` entry of ``shard`` at ``name``."""
    data = json.loads(index.read_text())
    data["weight_map"] = {k: (name if v == shard else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))


def edit_sidecar_metadata(path: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite a safetensors file with its ``nmcli`` metadata JSON edited (the data unchanged)."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    meta = json.loads(header["__metadata__"]["nmcli"])
    edit(meta)
    header["__metadata__"]["nmcli"] = json.dumps(meta)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + size :])


def snapshot(*roots: Path) -> dict[str, str]:
    """Every entry under ``roots``: the sha256 of a regular file, the kind of anything else (links not followed)."""
    seen: dict[str, str] = {}
    for root in roots:
        paths = [root] if not root.is_dir() or root.is_symlink() else [root, *root.rglob("*")]
        for path in paths:
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(mode):
                seen[str(path)] = "link -> " + os.readlink(path)
            else:
                seen[str(path)] = f"mode {stat.S_IFMT(mode):o}"
    return seen


def run_cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.stderr


def run_exe(exe: str, args: list[str]) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, env=env)
    return proc.returncode, proc.stderr


ETC_PASSWD = Path("/etc/passwd")


class Tree:
    """Every file under the test's folder (and /etc/passwd), to be compared after a refused command."""

    def __init__(self, root: Path) -> None:
        self.roots = [root, *([ETC_PASSWD] if ETC_PASSWD.is_file() else [])]
        self.before = snapshot(*self.roots)

    def assert_unchanged(self) -> None:
        after = snapshot(*self.roots)
        assert sorted(set(after) - set(self.before)) == [], "a refused command wrote a file"
        assert after == self.before, "a refused command changed a file"


def assert_refused(code: int, stderr: str, *, names: list[str], out: Path | None, tree: Tree) -> None:
    """Exit 2, one error line naming ``names`` (the file and the entry), nothing written, nothing changed."""
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    for name in names:
        assert name in errors[0], (name, errors[0])
    if out is not None:
        assert not out.exists() and not out.is_symlink()
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith((out.name, f".{out.name}"))]
        assert not leftovers, leftovers
    tree.assert_unchanged()


# --------------------------------------------------------------------------------------------
# prune DIR -o OUT: the console script for the headline cases


def test_prune_refuses_a_shard_outside_the_directory(nmcli_exe: str, case: Path) -> None:
    name = f"../bystander/{SHARD}"
    remap(case / "model" / INDEX, name)
    tree = Tree(case)
    code, err = run_exe(nmcli_exe, ["prune", str(case / "model"), "-o", str(case / "out")])
    assert_refused(code, err, names=[INDEX, repr(name), "'..'"], out=case / "out", tree=tree)


def test_prune_refuses_an_absolute_path_to_its_own_shard(nmcli_exe: str, case: Path) -> None:
    name = str(case / "model" / SHARD)
    remap(case / "model" / INDEX, name)
    tree = Tree(case)
    code, err = run_exe(nmcli_exe, ["prune", str(case / "model"), "-o", str(case / "out")])
    assert_refused(code, err, names=[INDEX, "absolute path"], out=case / "out", tree=tree)


def test_prune_never_opens_etc_passwd(nmcli_exe: str, case: Path) -> None:
    name = "../../etc/passwd"
    remap(case / "model" / INDEX, name)
    tree = Tree(case)
    code, err = run_exe(nmcli_exe, ["prune", str(case / "model"), "-o", str(case / "out"), "--json"])
    assert_refused(code, err, names=[INDEX, repr(name)], out=case / "out", tree=tree)


def test_prune_refuses_a_fifo_shard_without_blocking(nmcli_exe: str, case: Path) -> None:
    (case / "model" / SHARD).unlink()
    os.mkfifo(case / "model" / SHARD)  # opening it for reading would block forever
    tree = Tree(case)
    code, err = run_exe(nmcli_exe, ["prune", str(case / "model"), "-o", str(case / "out")])
    assert_refused(code, err, names=[INDEX, SHARD, "FIFO"], out=case / "out", tree=tree)


@pytest.mark.parametrize(
    ("target", "says"),
    [("bystander", "outside the directory"), ("/dev/null", "outside the directory")],
    ids=["symlink-out", "dev-null"],
)
def test_prune_refuses_a_symlinked_shard_leading_out(case: Path, target: str, says: str) -> None:
    link = case / "model" / SHARD
    link.unlink()
    link.symlink_to(case / "bystander" / SHARD if target == "bystander" else target)
    tree = Tree(case)
    code, err = run_cli(["prune", str(case / "model"), "-o", str(case / "out")])
    assert_refused(code, err, names=[INDEX, SHARD, says], out=case / "out", tree=tree)


def test_prune_refuses_a_side_file_linked_out(case: Path) -> None:
    (case / "model" / "tokenizer.json").symlink_to(ETC_PASSWD)
    tree = Tree(case)
    code, err = run_cli(["prune", str(case / "model"), "-o", str(case / "out")])
    assert_refused(code, err, names=["tokenizer.json", "outside the directory"], out=case / "out", tree=tree)


def test_prune_refuses_a_weight_index_of_another_format(case: Path) -> None:
    (case / "model" / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "../bystander/x.bin"}})
    )
    tree = Tree(case)
    code, err = run_cli(["prune", f"hf:{case / 'model'}", "-o", str(case / "out.safetensors")])
    assert_refused(
        code, err, names=["pytorch_model.bin.index.json", "lm_head.weight"], out=case / "out.safetensors", tree=tree
    )


def test_a_link_inside_the_directory_and_the_hf_cache_layout_are_fine(case: Path, tmp_path: Path) -> None:
    model = case / "model"
    (model / SHARD).rename(model / "real.bin")
    (model / SHARD).symlink_to("real.bin")
    assert SHARD in ShardedModel.open(model).files
    snapshot_dir = tmp_path / "hub" / "models--tiny--gpt2" / "snapshots" / "abc"
    blobs = tmp_path / "hub" / "models--tiny--gpt2" / "blobs"
    blobs.mkdir(parents=True)
    snapshot_dir.mkdir(parents=True)
    for entry in sorted(model.iterdir()):
        if entry.name == "real.bin" or entry.is_symlink():
            continue
        shutil.copy2(entry, blobs / entry.name)
        (snapshot_dir / entry.name).symlink_to(Path("../../blobs") / entry.name)
    shutil.copy2(model / "real.bin", blobs / "shard2")
    (snapshot_dir / SHARD).symlink_to(Path("../../blobs/shard2"))
    code, err = run_cli(["prune", str(snapshot_dir), "-o", str(tmp_path / "out")])
    assert code == 0, err


# --------------------------------------------------------------------------------------------
# inspect, sad and export --compress of a sharded output whose index or sidecar was edited


@pytest.mark.parametrize("command", ["inspect", "sad", "export"])
def test_edited_index_of_a_sharded_output(command: str, pruned_case: Path) -> None:
    name = f"../bystander/{SHARD}"
    remap(pruned_case / "model" / INDEX, name)
    tree = Tree(pruned_case)
    model, out = str(pruned_case / "model"), pruned_case / "out"
    args = {
        "inspect": ["inspect", model, "--strict"],
        "sad": ["sad", model, model],
        "export": ["export", model, "--compress", "-o", str(out)],
    }[command]
    code, err = run_cli(args)
    assert_refused(code, err, names=[INDEX, repr(name)], out=out, tree=tree)


def test_export_compress_refuses_an_absolute_shard(nmcli_exe: str, pruned_case: Path) -> None:
    remap(pruned_case / "model" / INDEX, str(pruned_case / "model" / SHARD))
    tree = Tree(pruned_case)
    out = pruned_case / "out"
    code, err = run_exe(nmcli_exe, ["export", str(pruned_case / "model"), "--compress", "-o", str(out)])
    assert_refused(code, err, names=[INDEX, "absolute path"], out=out, tree=tree)


@pytest.mark.parametrize("command", ["inspect", "export"])
def test_edited_sidecar_shard_names(command: str, pruned_case: Path) -> None:
    sidecar = pruned_case / "model" / SIDECAR

    def edit(meta: dict) -> None:
        meta["source"]["shards"] = {"../../etc/passwd": "0" * 64, **meta["source"]["shards"]}

    edit_sidecar_metadata(sidecar, edit)
    tree = Tree(pruned_case)
    out = pruned_case / "out"
    args = ["inspect", str(sidecar.parent)] if command == "inspect" else ["export", str(sidecar.parent), "--compress"]
    code, err = run_cli([*args, "-o", str(out)] if command == "export" else args)
    assert_refused(code, err, names=[SIDECAR, "'../../etc/passwd'"], out=out, tree=tree)


def test_sidecar_linked_out(pruned_case: Path) -> None:
    sidecar = pruned_case / "model" / SIDECAR
    sidecar.rename(pruned_case / "bystander" / SIDECAR)
    sidecar.symlink_to(pruned_case / "bystander" / SIDECAR)
    tree = Tree(pruned_case)
    code, err = run_cli(["export", str(sidecar.parent), "--compress", "-o", str(pruned_case / "out")])
    assert_refused(code, err, names=[SIDECAR, "outside the directory"], out=pruned_case / "out", tree=tree)


# --------------------------------------------------------------------------------------------
# ONNX external data


def _onnx_with_external(folder: Path, location: str) -> Path:
    """A one-MatMul ONNX whose weight is external data at ``location`` (relative to ``folder``)."""
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.zeros((8, 4), dtype=np.float32), "W")
    data = weight.raw_data
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    target = folder / location
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "model.onnx"
    onnx.save(model, str(path))  # the external data is written by hand above: save leaves it as it is
    return path


def test_onnx_external_data_beside_the_model_is_read(tmp_path: Path) -> None:
    path = _onnx_with_external(tmp_path, "model.onnx.data")
    code, err = run_cli(["inspect", str(path)])
    assert code == 0, err


@pytest.mark.parametrize("command", ["inspect", "bench"])
def test_onnx_external_data_outside(command: str, tmp_path: Path, nmcli_exe: str) -> None:
    folder = tmp_path / "onnx"
    folder.mkdir()
    path = _onnx_with_external(folder, "../x.bin")
    tree = Tree(tmp_path)
    if command == "inspect":
        code, err = run_exe(nmcli_exe, ["inspect", str(path)])
    else:
        pytest.importorskip("onnxruntime")
        code, err = run_cli(["bench", str(path), "--backend", "onnxruntime", "--iters", "1", "--warmup", "0"])
    assert_refused(code, err, names=["model.onnx", "'../x.bin'", "tensor 'W'"], out=None, tree=tree)


def test_onnx_external_data_a_fifo(tmp_path: Path) -> None:
    path = _onnx_with_external(tmp_path, "w.bin")
    (tmp_path / "w.bin").unlink()
    os.mkfifo(tmp_path / "w.bin")
    with pytest.raises(InputError, match="FIFO"):
        check_onnx_external_data(path)


# --------------------------------------------------------------------------------------------
# The rule itself


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("", "empty"),
        ("a\x00b", "NUL"),
        ("a\nb", "control character"),
        ("/etc/passwd", "absolute"),
        ("\\\\server\\share", "absolute"),
        ("C:\\x", "absolute"),
        ("..", "'..'"),
        ("a/../b", "'..'"),
        ("..\\x", "'..'"),
        ("sub/x.safetensors", "separator"),
        (".", "directory itself"),
        ("x" * 256, "limit"),
        ("é" * 128, "limit"),
        ("\ud800.safetensors", "encoded"),
        (7, "a number in the JSON, not a string"),
        (None, "null in the JSON"),
        ([], "an array"),
    ],
)
def test_name_problem(name: object, says: str) -> None:
    problem = name_problem(name)
    assert problem is not None and says in problem


@pytest.mark.parametrize("name", ["model-00001-of-00002.safetensors", "é.safetensors", "..x", "x..", "a" * 255])
def test_plain_names(name: str, tmp_path: Path) -> None:
    assert name_problem(name, tmp_path) is None
    assert member_path(tmp_path, name, source="f.json", entry="e", fix="fix it") == tmp_path / name


def test_member_path_refuses_a_directory_and_says_how_to_fix(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    with pytest.raises(InputError) as info:
        member_path(tmp_path, "sub", source="index.json", entry="weight_map['w']", fix="re-save it")
    message = str(info.value)
    assert "\n" not in message and message.startswith("index.json: weight_map['w'] names 'sub'")
    assert "a directory" in message and message.endswith(": re-save it")

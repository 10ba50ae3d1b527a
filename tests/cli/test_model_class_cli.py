"""``--model-class`` on every command that builds an ``hf:`` source (issue 24): finetune, export, bench,
inspect and sad take prune's option, with its validation and messages.

The flag picks the class of the ``hf:`` sources a command builds (the target, ``--arch``, ``--teacher``,
sad's inputs). A checkpoint records its class and is rebuilt with it: the flag may repeat it, and one
that contradicts it is exit 2 in one line, as an ``--arch`` whose tensors do not fit is; given with
``--arch hf:DIR`` it is that folder's class. Where no ``hf:`` source takes it, it is exit 2 too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner, Result

from nmcli.cli.app import app
from tests.conftest import py_source, save_tiny_bert

transformers = pytest.importorskip("transformers", reason="transformers is not installed (hf extra)")

runner = CliRunner()
SHAPE = "input_ids:1x16:int64,attention_mask:1x16:int64"
COMMANDS = ("prune", "finetune", "export", "bench", "inspect", "sad")


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def ok(*args: str) -> Result:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def refused(*args: str) -> str:
    """The one line a command that exits 2 ends with."""
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), result.stderr
    return line


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BERT classifier folder, its base model and its whole classifier pruned, and token data."""
    root = tmp_path_factory.mktemp("model-class")
    folder = save_tiny_bert(root / "classifier", "BertForSequenceClassification")
    ok("prune", f"hf:{folder}", "--model-class", "base", "--input-shape", SHAPE, "-o", str(root / "base.safetensors"))
    ok("prune", f"hf:{folder}", "--input-shape", SHAPE, "-o", str(root / "auto.safetensors"))
    ids = {"input_ids": torch.randint(0, 64, (16, 16)), "attention_mask": torch.ones(16, 16, dtype=torch.int64)}
    save_file(ids, str(root / "ids.safetensors"))
    return root


@pytest.fixture(scope="module")
def mislabeled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Masked-LM files whose config.json names BertForSequenceClassification: auto finds no class that fits
    (the classifier head is missing, the base model has no place for cls.predictions); the files' class does."""
    folder = save_tiny_bert(tmp_path_factory.mktemp("mislabeled") / "mlm", "BertForMaskedLM")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _outputs(path: Path) -> list[list[int]]:
    return [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in onnx.load(str(path)).graph.output]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_lists_the_one_option(command: str) -> None:
    assert "--model-class" in ok(command, "--help").stdout


def test_base_builds_the_encoder_where_auto_builds_the_classifier(root: Path) -> None:
    folder = f"hf:{root / 'classifier'}"
    for cls, out in (("auto", "auto.onnx"), ("base", "base.onnx")):
        ok("export", folder, "--model-class", cls, "--onnx", "--input-shape", SHAPE, "-o", str(root / out))
    assert _outputs(root / "auto.onnx") == [[1, 2]]  # the classifier's logits
    assert _outputs(root / "base.onnx")[0] == [1, 16, 32]  # the encoder's hidden states
    layers = [layer["param"] for layer in json.loads(ok("inspect", folder, "--json").stdout)["layers"]]
    assert "classifier.weight" in layers
    base = json.loads(ok("inspect", folder, "--model-class", "base", "--json").stdout)["layers"]
    assert base and not any(layer["param"].startswith(("classifier", "bert.")) for layer in base)
    # the base checkpoint against the dense model it came from: the same layers, masks from the same rule
    assert (
        json.loads(ok("sad", str(root / "base.safetensors"), folder, "--model-class", "base", "--json").stdout)["sad"]
        == 0
    )
    assert "cannot be compared" in refused("sad", str(root / "base.safetensors"), folder)
    data = ("--data", f"tensors:{root / 'ids.safetensors'}", "--steps", "1", "--batch-size", "4", "--eval-split", "0")
    out = str(root / "ft.safetensors")
    assert "--teacher" in refused("finetune", str(root / "base.safetensors"), *data, "--teacher", folder, "-o", out)
    ok("finetune", str(root / "base.safetensors"), *data, "--teacher", folder, "--model-class", "base", "-o", out)


@pytest.mark.parametrize(
    "args",
    [
        ("export", "--onnx", "--no-verify", "--input-shape", SHAPE, "-o", "{root}/mlm.onnx", "--force"),
        ("bench", "--iters", "1", "--warmup", "0", "--input-shape", SHAPE),
        ("inspect",),
    ],
    ids=["export", "bench", "inspect"],
)
def test_a_class_that_auto_cannot_find_is_named(args: tuple[str, ...], mislabeled: Path, root: Path) -> None:
    command, *rest = (a.format(root=root) for a in args)
    line = refused(command, f"hf:{mislabeled}", *rest)
    assert "--model-class" in line and "classifier" in line
    ok(command, f"hf:{mislabeled}", *rest, "--model-class", "BertForMaskedLM")


@pytest.mark.parametrize(
    "args",
    [
        ("export", "{ckpt}", "--onnx", "-o", "{root}/x.onnx"),
        ("bench", "{ckpt}", "--iters", "1"),
        ("inspect", "{ckpt}"),
        ("inspect", "{ckpt}", "--rebuild"),
        ("sad", "{ckpt}", "{ckpt}"),
        ("finetune", "{ckpt}", "--data", "tensors:{root}/ids.safetensors", "-o", "{root}/x.safetensors"),
        ("prune", "{ckpt}", "-p", "1:4", "-o", "{root}/x.safetensors"),
    ],
    ids=["export", "bench", "inspect", "inspect-rebuild", "sad", "finetune", "prune"],
)
def test_a_class_that_contradicts_a_checkpoint_is_exit_2(args: tuple[str, ...], root: Path) -> None:
    ckpt = root / "base.safetensors"
    command = [a.format(ckpt=ckpt, root=root) for a in args]
    line = refused(*command, "--model-class", "BertForSequenceClassification")
    assert "'BertForSequenceClassification' contradicts" in line and "(--model-class base)" in line
    assert "drop --model-class" in line
    assert not any(root.glob("x.*"))  # nothing written
    auto = [a.format(ckpt=root / "auto.safetensors", root=root) for a in args]
    assert "(--model-class auto)" in refused(*auto, "--model-class", "base")


def test_repeating_the_recorded_class_changes_nothing(root: Path) -> None:
    ckpt = str(root / "base.safetensors")
    plain = json.loads(ok("inspect", ckpt, "--rebuild", "--json").stdout)
    assert json.loads(ok("inspect", ckpt, "--rebuild", "--model-class", "base", "--json").stdout) == plain
    ok("export", ckpt, "--model-class", "base", "-o", str(root / "same.onnx"))


def test_with_arch_hf_dir_the_class_is_that_folders(tmp_path: Path) -> None:
    """--arch overrides a moved source, and --model-class goes with it (the recorded class when not given)."""
    folder = save_tiny_bert(tmp_path / "classifier", "BertForSequenceClassification")
    ckpt = str(tmp_path / "base.safetensors")
    ok("prune", f"hf:{folder}", "--model-class", "base", "--input-shape", SHAPE, "-o", ckpt)
    moved = tmp_path / "moved"
    shutil.move(folder, moved)
    assert "--arch" in refused("export", ckpt, "--no-verify", "-o", str(tmp_path / "a.onnx"))
    ok("export", ckpt, "--arch", f"hf:{moved}", "--no-verify", "-o", str(tmp_path / "b.onnx"))
    ok("export", ckpt, "--arch", f"hf:{moved}", "--model-class", "base", "--no-verify", "-o", str(tmp_path / "c.onnx"))
    line = refused("export", ckpt, "--arch", f"hf:{moved}", "--model-class", "BertForSequenceClassification",
                   "--no-verify", "-o", str(tmp_path / "d.onnx"))  # fmt: skip
    assert "does not fit the architecture" in line  # the head-class model has no place for the base's tensors


def test_where_no_hf_source_takes_it_it_is_exit_2(workdir: Path) -> None:
    mlp = py_source("tiny_mlp")
    ok("prune", mlp, "-o", "a.safetensors")
    ok("prune", mlp, "-o", "b.safetensors")
    assert refused("prune", mlp, "--model-class", "base", "-o", "c.safetensors").endswith(
        "is not one: drop --model-class"
    )
    assert "torch backend only" in refused("bench", "model.onnx", "--model-class", "base")
    assert "model.onnx is not one" in refused("inspect", "model.onnx", "--model-class", "base")
    assert "--compress alone" in refused("export", "a.safetensors", "--compress", "--model-class", "base")
    assert "drop --model-class" in refused("export", "a.safetensors", "--format", "plain", "--model-class", "base")
    assert "which is not one" in refused("sad", "a.safetensors", "b.safetensors", "--model-class", "base")
    assert "which is not one" in refused("export", "a.safetensors", "--model-class", "base")
    assert not list(workdir.glob("c.*")) and not list(workdir.glob("*.onnx"))


@pytest.mark.parametrize("command", ["prune", "export", "bench", "inspect", "sad"])
def test_an_unknown_class_gets_prunes_message(command: str, root: Path) -> None:
    folder = f"hf:{root / 'classifier'}"
    line = refused(command, folder, *([folder] if command == "sad" else []), "--model-class", "NoSuchClass")
    assert line.endswith(
        "--model-class 'NoSuchClass' is not a transformers model class: give auto, base or a class such as BertModel"
    )


def test_json_and_the_console_script_say_it_the_same_way(root: Path, nmcli_exe: str) -> None:
    ckpt = str(root / "base.safetensors")
    result = invoke("bench", ckpt, "--model-class", "BertModel", "--json")
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert error["code"] == 2 and "'BertModel' contradicts" in error["message"]
    done = subprocess.run(
        [nmcli_exe, "export", f"hf:{root / 'classifier'}", "--model-class", "base", "--input-shape", SHAPE,
         "--no-verify", "-o", str(root / "script.onnx"), "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["onnx"] == str(root / "script.onnx")
    assert _outputs(root / "script.onnx")[0] == [1, 16, 32]
    done = subprocess.run(
        [nmcli_exe, "inspect", ckpt, "--model-class", ""], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --model-class '' is not a transformers model class: give auto, base or a class such as BertModel"
    ]

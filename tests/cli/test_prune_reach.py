"""``nmcli prune`` on any model that runs (issue 24): blocks that change shape or do not chain, the path
in ``--json``, and ``--model-class``: never a layer whose weights the files do not hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner, Result

from nmcli.cli.app import app
from tests.conftest import py_source, save_tiny_bert

runner = CliRunner()


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


@pytest.mark.parametrize(
    ("factory", "shape", "path"),
    [("efficientnet_liteish", (48, 1, 8, 8), "blocks"), ("cross_skip_mlp", (48, 64), "stages")],
)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_models_whose_blocks_change_shape_or_skip_are_pruned(
    workdir: Path, factory: str, shape: tuple[int, ...], path: str, method: str
) -> None:
    torch.manual_seed(0)
    save_file({"inputs": torch.rand(shape)}, str(workdir / "calib.safetensors"))
    result = invoke(
        "prune", py_source(factory), "--method", method, "--calib", "tensors:calib.safetensors",
        "-o", "out.safetensors", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["calibration_path"] == path
    assert "report this model" not in result.output


def test_magnitude_on_a_batchnorm_model_names_the_flag_that_reestimates(workdir: Path) -> None:
    result = invoke("prune", py_source("efficientnet_liteish"), "-o", "out.safetensors", "--json")
    assert result.exit_code == 0, result.output
    assert any("--calib SPEC" in note for note in json.loads(result.stdout)["notes"])


@pytest.fixture()
def head_named_folder(workdir: Path) -> Path:
    """A tiny BERT encoder saved with save_pretrained whose config names BertForMaskedLM (head not saved)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    folder = workdir / "encoder"
    transformers.BertModel(cfg).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_head_the_files_lack_is_never_built(head_named_folder: Path) -> None:
    stored = set(load_file(str(head_named_folder / "model.safetensors")))
    outputs = []
    for out in ("a.safetensors", "b.safetensors"):
        result = invoke("prune", f"hf:{head_named_folder}", "-o", out, "--json")
        assert result.exit_code == 0, result.output
        outputs.append(Path(out).read_bytes())
        tensors = load_file(out)
        assert {
            n for n in tensors if not n.startswith("__nmcli__/")
        } == stored  # no randomly initialised head, nothing dropped
    assert outputs[0] == outputs[1]
    streamed = invoke("prune", f"hf:{head_named_folder}", "-o", "dir-out", "--json")
    assert streamed.exit_code == 0, streamed.output
    assert set(load_file("dir-out/model.safetensors")) == stored


def test_a_class_whose_weights_are_missing_is_exit_2(head_named_folder: Path) -> None:
    for extra in ([], ["-o", "dir-out"]):
        result = invoke("prune", f"hf:{head_named_folder}", "--model-class", "BertForMaskedLM", *extra)
        assert result.exit_code == 2, result.output
        line = result.stderr.strip().splitlines()[-1]
        assert "cls.predictions" in line and "--model-class" in line
    assert invoke("prune", f"hf:{head_named_folder}", "--model-class", "NoSuchClass").exit_code == 2
    assert invoke("prune", f"hf:{head_named_folder}", "--model-class", "base", "-o", "b.safetensors").exit_code == 0


@pytest.fixture()
def classifier_folder(workdir: Path) -> Path:
    """A tiny BERT sequence classifier saved with save_pretrained: ``bert.*`` (pooler included) and a head."""
    return save_tiny_bert(workdir / "classifier", "BertForSequenceClassification")


_SHAPE = "input_ids:1x16:int64,attention_mask:1x16:int64"


@pytest.mark.parametrize("out", ["base.safetensors", "base-dir"])
def test_the_chosen_class_is_recorded_and_rebuilt_by_export(classifier_folder: Path, out: str) -> None:
    pruned = invoke("prune", f"hf:{classifier_folder}", "--model-class", "base", "-o", out, "--json")
    assert pruned.exit_code == 0, pruned.output
    assert not any("classifier" in layer["name"] for layer in json.loads(pruned.stdout)["layers"])
    exported = invoke("export", out, "--onnx", "-o", "base.onnx", "--input-shape", _SHAPE, "--json")
    assert exported.exit_code == 0, exported.output
    assert invoke("inspect", "base.onnx", "--strict").exit_code == 0


def test_a_base_model_part_the_files_never_held_is_exit_2(workdir: Path) -> None:
    """A masked-LM folder holds no pooler: ``--model-class base`` (BertModel, pooler included) would prune a random one."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    transformers.BertForMaskedLM(cfg).save_pretrained(workdir / "mlm")
    result = invoke("prune", "hf:mlm", "--model-class", "base", "-o", "out.safetensors")
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert "BertModel" in line and "pooler.dense.weight" in line and "--model-class auto" in line
    assert not Path("out.safetensors").exists()
    assert invoke("prune", "hf:mlm", "-o", "auto.safetensors").exit_code == 0  # auto builds BertForMaskedLM

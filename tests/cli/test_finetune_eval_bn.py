"""``nmcli finetune`` stays true in eval mode: BatchNorm re-estimation, held-out evaluation that a plain
PyTorch load reproduces, exact resume after Ctrl-C, and option errors (issue 10)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from fixtures.digits import accuracy, digits_split, train_dense
from fixtures.models import digits_bn_cnn
from nmcli.cli.app import app
from nmcli.commands.finetune import run_finetune
from nmcli.commands.prune import run_prune
from nmcli.formats.open import load_checkpoint
from nmcli.pipelines.training import FinetuneConfig
from tests.conftest import MODELS_PY, py_source

runner = CliRunner()


@pytest.fixture(scope="module")
def trained_cnn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A BatchNorm CNN trained on scikit-learn's digits (>= 97% test accuracy), its data, and its weights."""
    pytest.importorskip("sklearn")
    x_train, x_test, y_train, y_test = digits_split(images=True)
    model = train_dense(digits_bn_cnn(), x_train, y_train)
    folder = tmp_path_factory.mktemp("bncnn")
    weights = folder / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    save_file({"inputs": x_train, "targets": y_train}, str(folder / "train.safetensors"))
    save_file({"inputs": x_test, "targets": y_test}, str(folder / "test.safetensors"))
    dense = accuracy(model, x_test, y_test)
    assert dense >= 0.97, dense
    pruned = folder / "cnn-2of4.safetensors"
    run_prune(str(weights), arch=py_source("digits_bn_cnn"), pattern="2:4", keep_dense=True, output=pruned)
    return {"folder": folder, "pruned": pruned, "dense": dense, "x_test": x_test, "y_test": y_test}


def test_saved_model_scores_in_eval_mode_what_finetune_reports(trained_cnn: dict, tmp_path: Path) -> None:
    folder, out = trained_cnn["folder"], tmp_path / "cnn-ft.safetensors"
    result = runner.invoke(app, [
        "finetune", str(trained_cnn["pruned"]), "--data", f"tensors:{folder / 'train.safetensors'}",
        "--eval-data", f"tensors:{folder / 'test.safetensors'}", "--steps", "40", "--batch-size", "32",
        "--lr", "0.01", "--device", "cpu", "--eval-every", "20", "-o", str(out), "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    before, after = summary["eval"]["before"], summary["eval"]["after"]
    assert {"accuracy", "loss", "teacher_top1", "teacher_kl", "examples"} <= set(after)
    assert summary["eval"]["during"][0]["step"] == 20
    assert summary["bn"] == {"mode": "train", "recalibrated_batches": 43}
    # a plain PyTorch load of the saved file, in eval mode, scores exactly what finetune reported
    model = digits_bn_cnn()
    state = {k: v for k, v in load_file(str(out)).items() if not k.startswith("__nmcli__")}
    model.load_state_dict(state)
    plain = accuracy(model, trained_cnn["x_test"], trained_cnn["y_test"])
    assert abs(plain - after["accuracy"]) <= 1e-6
    assert plain >= trained_cnn["dense"] - 0.01, (plain, trained_cnn["dense"], before)
    record = load_checkpoint(out).meta.history[-1]["metrics"]
    assert record["eval_after"]["accuracy"] == after["accuracy"] and record["bn_recalibrated_batches"] == 43
    assert "eval before:" in result.stderr and "eval at step 20:" in result.stderr


def _cfg(optimizer: str, **overrides: object) -> FinetuneConfig:
    base: dict[str, object] = {
        "data": "", "steps": 6, "batch_size": 16, "grad_accum": 2, "optimizer": optimizer,
        "lr": 0.05 if optimizer == "sgd" else 1e-3, "device": "cpu", "bn_batches": 4, "save_every": 0,
    }  # fmt: skip
    base.update(overrides)
    return FinetuneConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_ctrl_c_mid_step_then_resume_is_bit_identical(trained_cnn: dict, tmp_path: Path, optimizer: str) -> None:
    data = f"tensors:{trained_cnn['folder'] / 'train.safetensors'}"
    full = run_finetune(trained_cnn["pruned"], _cfg(optimizer, data=data), output=tmp_path / "full.safetensors")
    assert not full.interrupted

    # Ctrl-C arrives in the middle of step 3: during the training forward pass of its second micro-batch
    calls = {"n": 0}

    def interrupt(module: nn.Module, args: object, output: object) -> None:
        if isinstance(module, nn.Sequential) and module.training:
            calls["n"] += 1
            if calls["n"] == 2 * 2 + 2:
                os.kill(os.getpid(), signal.SIGINT)

    handle = nn.modules.module.register_module_forward_hook(interrupt)
    try:
        cut = run_finetune(trained_cnn["pruned"], _cfg(optimizer, data=data), output=tmp_path / "cut.safetensors")
    finally:
        handle.remove()
    assert cut.interrupted and cut.steps == 3  # the step in flight was finished, not cut in half
    resumed = run_finetune(
        trained_cnn["pruned"], _cfg(optimizer, data=data), output=tmp_path / "cut.safetensors", resume=True
    )
    assert resumed.steps == 6 and not resumed.interrupted
    a, b = load_checkpoint(tmp_path / "full.safetensors"), load_checkpoint(tmp_path / "cut.safetensors")
    for name, value in a.tensors.items():  # effective weights and BN statistics (re-estimated at the end)
        assert torch.equal(value, b.tensors[name]), name
    for name, value in a.dense.items():
        assert torch.equal(value, b.dense[name]), name
    for name, value in a.masks.items():
        assert torch.equal(value, b.masks[name]), name


def test_resume_with_a_save_every_checkpoint_keeps_training_statistics(trained_cnn: dict, tmp_path: Path) -> None:
    data = f"tensors:{trained_cnn['folder'] / 'train.safetensors'}"
    full = tmp_path / "full.safetensors"
    run_finetune(trained_cnn["pruned"], _cfg("sgd", data=data, save_every=2), output=full)

    def stop_at_4(info: object) -> None:
        if getattr(info, "step", 0) == 4:
            raise KeyboardInterrupt

    cut = tmp_path / "cut.safetensors"
    result = run_finetune(trained_cnn["pruned"], _cfg("sgd", data=data, save_every=2), output=cut, on_step=stop_at_4)
    assert result.interrupted and result.steps == 4
    # the partial checkpoint's BN statistics are re-estimated, the training ones kept for resuming
    run_finetune(trained_cnn["pruned"], _cfg("sgd", data=data, save_every=2), output=cut, resume=True)
    a, b = load_checkpoint(full), load_checkpoint(cut)
    for name, value in a.tensors.items():
        assert torch.equal(value, b.tensors[name]), name


def test_resume_refuses_an_unrelated_output(trained_cnn: dict, tmp_path: Path) -> None:
    unrelated = tmp_path / "precious.safetensors"
    unrelated.write_bytes(b"my own results")
    digest = hashlib.sha256(unrelated.read_bytes()).hexdigest()
    result = runner.invoke(app, [
        "finetune", str(trained_cnn["pruned"]), "--data", f"tensors:{trained_cnn['folder'] / 'train.safetensors'}",
        "--steps", "2", "--device", "cpu", "--resume", "-o", str(unrelated),
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "not a partial checkpoint of this run" in result.stderr and "--force" in result.stderr
    assert hashlib.sha256(unrelated.read_bytes()).hexdigest() == digest


def test_bn_freeze_keeps_running_statistics_until_the_reestimation(trained_cnn: dict, tmp_path: Path) -> None:
    data = f"tensors:{trained_cnn['folder'] / 'train.safetensors'}"
    start = load_checkpoint(trained_cnn["pruned"])
    out = tmp_path / "frozen.safetensors"
    run_finetune(trained_cnn["pruned"], _cfg("sgd", data=data, bn="freeze", bn_batches=0, lr=1e-3), output=out)
    frozen = load_checkpoint(out)
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(frozen.tensors[name], start.tensors[name]), name
    assert not torch.equal(frozen.tensors["1.weight"], start.tensors["1.weight"])  # affine still trained


@pytest.fixture()
def mlp(tmp_path: Path) -> tuple[Path, Path]:
    pruned = tmp_path / "mlp.safetensors"
    run_prune(py_source("tiny_mlp"), pattern="2:4", keep_dense=True, output=pruned)
    data = tmp_path / "d.safetensors"
    save_file({"inputs": torch.randn(32, 64), "targets": torch.randint(0, 10, (32,))}, str(data))
    return pruned, data


@pytest.mark.parametrize(
    ("option", "value"),
    [("--epochs", "inf"), ("--epochs", "nan"), ("--lr", "nan"), ("--lr", "inf"), ("--lambda-w", "nan"),
     ("--temperature", "nan"), ("--eval-split", "0.9"), ("--momentum", "-1"), ("--bn-batches", "-2")],
)  # fmt: skip
def test_bad_numbers_are_exit_2_naming_the_option(mlp: tuple[Path, Path], option: str, value: str) -> None:
    pruned, data = mlp
    result = runner.invoke(app, ["finetune", str(pruned), "--data", f"tensors:{data}", option, value])
    assert result.exit_code == 2, result.output
    assert option in result.stderr and "Traceback" not in result.output


def test_data_and_teacher_problems_are_exit_2(mlp: tuple[Path, Path], tmp_path: Path) -> None:
    pruned, data = mlp
    folder = runner.invoke(app, ["finetune", str(pruned), "--data", f"text:{tmp_path}", "-o", "x.safetensors"])
    assert folder.exit_code == 2 and "is a directory" in folder.stderr
    bad_bn = runner.invoke(app, ["finetune", str(pruned), "--data", f"tensors:{data}", "--bn", "sometimes"])
    assert bad_bn.exit_code == 2 and "--bn 'sometimes'" in bad_bn.stderr
    teacher = runner.invoke(app, [
        "finetune", str(pruned), "--data", f"tensors:{data}", "--teacher", f"py:{MODELS_PY}:tiny_cnn",
        "--steps", "1", "--device", "cpu", "-o", str(tmp_path / "t.safetensors"),
    ])  # fmt: skip
    assert teacher.exit_code == 2, teacher.output
    assert "the teacher (--teacher" in teacher.stderr and "--data" in teacher.stderr


def test_interrupted_summary_says_how_to_resume(mlp: tuple[Path, Path], tmp_path: Path) -> None:
    pruned, _ = mlp
    module = tmp_path / "interrupting.py"
    module.write_text(
        "import os, signal, torch\n"
        "class Data(torch.utils.data.Dataset):\n"
        "    def __init__(self):\n"
        "        g = torch.Generator().manual_seed(0)\n"
        "        self.x, self.y, self.calls = torch.randn(64, 64, generator=g), torch.randint(0, 10, (64,), generator=g), 0\n"
        "    def __len__(self):\n"
        "        return 64\n"
        "    def __getitem__(self, i):\n"
        "        self.calls += 1\n"
        "        if self.calls == 40:\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return self.x[i], self.y[i]\n"
        "def data():\n"
        "    return Data()\n",
        encoding="utf-8",
    )
    out = tmp_path / "run.safetensors"
    result = runner.invoke(app, ["finetune", str(pruned), "--data", f"py:{module}:data", "--steps", "50",
                                 "--batch-size", "8", "--eval-split", "0", "--device", "cpu", "-o", str(out)])  # fmt: skip
    assert result.exit_code == 130, result.output
    assert "interrupted at step" in result.stderr and "of 50" in result.stderr
    assert "resume with: nmcli" in result.stderr and "--resume" in result.stderr
    assert "fine-tuned" not in result.stderr

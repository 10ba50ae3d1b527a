"""The fine-tuning run: one step against a hand-written SGD update, resume equivalence, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fixtures.models import tiny_mlp
from nmcli.commands.finetune import run_finetune
from nmcli.commands.prune import run_prune
from nmcli.errors import BackendUnavailableError, DataError, InputError
from nmcli.formats.open import load_checkpoint
from nmcli.formats.trainstate import trainstate_path
from nmcli.nm.masks import nm_mask
from nmcli.pipelines.training import FinetuneConfig, StepInfo, lr_factor
from tests.conftest import py_source

N_EXAMPLES = 32


@pytest.fixture()
def pruned(tmp_path: Path) -> Path:
    out = tmp_path / "mlp-2of4.safetensors"
    run_prune(py_source("tiny_mlp"), pattern="2:4", keep_dense=True, output=out)
    return out


@pytest.fixture()
def data_file(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(1)
    path = tmp_path / "train.safetensors"
    save_file(
        {
            "inputs": torch.randn(N_EXAMPLES, 64, generator=gen),
            "targets": torch.randint(0, 10, (N_EXAMPLES,), generator=gen),
        },
        str(path),
    )
    return path


def _plain_sgd(**overrides: object) -> FinetuneConfig:
    base: dict[str, object] = {
        "teacher": "none",
        "eval_split": 0.0,
        "steps": 1,
        "batch_size": N_EXAMPLES,
        "lr": 0.5,
        "schedule": "constant",
        "warmup_steps": 0,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "device": "cpu",
    }
    base.update(overrides)
    return FinetuneConfig(**base)  # type: ignore[arg-type]


def _hand_update(ckpt_path: Path, data: Path, lr: float, lambda_w: float, weight_decay: float = 0.0) -> dict:
    """One SGD step on the SR-STE gradient, written out by hand on the dense weights."""
    from safetensors.torch import load_file

    ckpt = load_checkpoint(ckpt_path)
    tensors = load_file(str(data))
    x, y = tensors["inputs"], tensors["targets"]
    state = {k: v.clone() for k, v in ckpt.tensors.items()}
    state.update(ckpt.dense)
    leaves = {}
    for name, value in state.items():
        eff = value * ckpt.masks[name] if name in ckpt.masks else value
        leaves[name] = eff.clone().requires_grad_(True)
    h = F.relu(x @ leaves["0.weight"].T + leaves["0.bias"])
    h = F.relu(h @ leaves["2.weight"].T + leaves["2.bias"])
    logits = h @ leaves["4.weight"].T + leaves["4.bias"]
    F.cross_entropy(logits, y).backward()
    expected = {}
    for name, value in state.items():
        grad = leaves[name].grad
        if name in ckpt.masks:
            grad = grad + lambda_w * (~ckpt.masks[name]).float() * value
        if value.dim() >= 2:
            grad = grad + weight_decay * value
        expected[name] = value - lr * grad
    return expected


@pytest.mark.parametrize(("ste", "lambda_w"), [("sr", 0.05), ("plain", 0.05)])
def test_one_step_is_one_sgd_step_on_the_srste_gradient(
    pruned: Path, data_file: Path, tmp_path: Path, ste: str, lambda_w: float
) -> None:
    out = tmp_path / "out.safetensors"
    cfg = _plain_sgd(data=f"tensors:{data_file}", ste=ste, lambda_w=lambda_w)
    result = run_finetune(pruned, cfg, output=out)
    assert result.steps == 1 and result.output == out
    expected = _hand_update(pruned, data_file, 0.5, lambda_w if ste == "sr" else 0.0)
    got = load_checkpoint(out)
    for name, value in expected.items():
        actual = got.dense.get(name, got.tensors[name])
        torch.testing.assert_close(actual, value, rtol=1e-5, atol=1e-6, msg=name)
        if name in got.masks:  # masks of the final dense weights; effective = mask * dense
            assert torch.equal(got.masks[name], nm_mask(actual, got.meta.layer(name).pattern, 1))
            assert torch.equal(got.tensors[name], torch.where(got.masks[name], actual, torch.zeros(())))


def test_weight_decay_is_applied_once_and_not_to_biases(pruned: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    run_finetune(pruned, _plain_sgd(data=f"tensors:{data_file}", lambda_w=0.05, weight_decay=0.1), output=out)
    expected = _hand_update(pruned, data_file, 0.5, 0.05, weight_decay=0.1)
    got = load_checkpoint(out)
    for name, value in expected.items():
        torch.testing.assert_close(got.dense.get(name, got.tensors[name]), value, rtol=1e-5, atol=1e-6, msg=name)


def test_grad_accum_equals_the_full_batch(pruned: Path, data_file: Path, tmp_path: Path) -> None:
    full, accum = tmp_path / "full.safetensors", tmp_path / "accum.safetensors"
    run_finetune(pruned, _plain_sgd(data=f"tensors:{data_file}"), output=full)
    run_finetune(
        pruned, _plain_sgd(data=f"tensors:{data_file}", batch_size=N_EXAMPLES // 4, grad_accum=4), output=accum
    )
    a, b = load_checkpoint(full), load_checkpoint(accum)
    for name in a.dense:
        torch.testing.assert_close(a.dense[name], b.dense[name], rtol=1e-5, atol=1e-6)


def test_resume_equals_an_uninterrupted_run(pruned: Path, data_file: Path, tmp_path: Path) -> None:
    cfg = FinetuneConfig(
        data=f"tensors:{data_file}", teacher="auto", steps=6, batch_size=8, lr=0.05, mask_interval=2, device="cpu"
    )
    straight = tmp_path / "straight.safetensors"
    uninterrupted = run_finetune(pruned, cfg, output=straight)

    def stop_at_3(info: StepInfo) -> None:
        if info.step == 3:
            raise KeyboardInterrupt  # what Ctrl-C does

    halves = tmp_path / "halves.safetensors"
    first = run_finetune(pruned, cfg, output=halves, on_step=stop_at_3)
    assert first.interrupted and first.steps == 3
    assert trainstate_path(halves).is_file()
    partial = load_checkpoint(halves)
    assert partial.meta.history[-1]["metrics"]["partial"] is True
    second = run_finetune(pruned, cfg, output=halves, resume=True)
    assert second.steps == 6 and not second.interrupted
    assert not trainstate_path(halves).exists()  # completed: the sidecar is gone

    a, b = load_checkpoint(straight), load_checkpoint(halves)
    for name in a.tensors:
        torch.testing.assert_close(a.tensors[name], b.tensors[name], rtol=1e-6, atol=1e-7, msg=name)
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name])
    assert second.final_loss == pytest.approx(uninterrupted.final_loss)
    assert [h["command"] for h in b.meta.history] == ["prune", "finetune"]


def test_history_no_dense_and_sad(pruned: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    cfg = FinetuneConfig(data=f"tensors:{data_file}", steps=4, batch_size=8, lr=0.5, no_dense=True, device="cpu")
    result = run_finetune(pruned, cfg, output=out)
    got = load_checkpoint(out)
    assert got.dense == {}
    record = got.meta.history[-1]
    assert record["command"] == "finetune"
    assert record["metrics"]["steps"] == 4
    assert record["metrics"]["final_loss"] == pytest.approx(result.final_loss)
    start = load_checkpoint(pruned).masks
    flips = sum(int((start[n] ^ got.masks[n]).sum()) for n in start)
    assert record["metrics"]["sad_vs_start"] == flips == result.sad_vs_start.sad
    assert set(result.to_json()) >= {"output", "steps", "final_loss", "sad_vs_start", "seconds"}


def test_lr_schedule() -> None:
    assert [lr_factor(s, 10, 2, "constant") for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "cosine") == 1.0
    assert lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)


def test_errors_before_training(pruned: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    wrong = tmp_path / "wrong.safetensors"
    save_file({"inputs": torch.randn(8, 7)}, str(wrong))
    with pytest.raises(DataError, match="does not fit the model"):
        run_finetune(pruned, FinetuneConfig(data=f"tensors:{wrong}", steps=1, batch_size=4), output=out)
    labels = tmp_path / "labels.safetensors"
    save_file({"inputs": torch.randn(8, 64), "targets": torch.full((8,), 12)}, str(labels))
    with pytest.raises(DataError, match="class indices"):
        run_finetune(pruned, FinetuneConfig(data=f"tensors:{labels}", steps=1, batch_size=4), output=out)
    unlabeled = tmp_path / "unlabeled.safetensors"
    save_file({"inputs": torch.randn(8, 64)}, str(unlabeled))
    with pytest.raises(DataError, match="nothing to train toward"):
        run_finetune(
            pruned, FinetuneConfig(data=f"tensors:{unlabeled}", teacher="none", steps=1, batch_size=4), output=out
        )
    with pytest.raises(DataError, match="fewer than --batch-size"):
        run_finetune(pruned, FinetuneConfig(data=f"tensors:{data_file}", steps=1, batch_size=64), output=out)
    with pytest.raises(InputError, match="--ste"):
        run_finetune(pruned, FinetuneConfig(data=f"tensors:{data_file}", ste="fancy"), output=out)
    with pytest.raises(InputError, match="--resume"):
        run_finetune(pruned, FinetuneConfig(data=f"tensors:{data_file}"), output=out, resume=True)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="CUDA"):
            run_finetune(pruned, FinetuneConfig(data=f"tensors:{data_file}", device="cuda"), output=out)
    with pytest.raises(InputError, match="fp16"):
        run_finetune(pruned, FinetuneConfig(data=f"tensors:{data_file}", device="cpu", precision="fp16"), output=out)
    assert not out.exists()


def test_bf16_autocast_on_cpu_trains(pruned: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16.safetensors"
    result = run_finetune(
        pruned,
        FinetuneConfig(data=f"tensors:{data_file}", steps=2, batch_size=8, precision="bf16", device="cpu"),
        output=out,
    )
    assert result.final_loss is not None and result.final_loss > 0
    assert load_checkpoint(out).dense["0.weight"].dtype == torch.float32


@pytest.mark.gpu
def test_cuda_fp16_and_bf16(pruned: Path, data_file: Path, tmp_path: Path) -> None:
    for precision in ("fp16", "bf16"):
        out = tmp_path / f"{precision}.safetensors"
        cfg = FinetuneConfig(data=f"tensors:{data_file}", steps=3, batch_size=8, precision=precision, device="cuda")
        result = run_finetune(pruned, cfg, output=out)
        assert result.steps == 3 and result.final_loss is not None
        assert load_checkpoint(out).meta.history[-1]["arguments"]["precision"] == precision


def test_mlp_factory_is_the_source(pruned: Path) -> None:
    # the teacher 'auto' of a checkpoint with dense weights is the dense model itself
    from nmcli.pipelines.training import load_teacher

    teacher = load_teacher("auto", load_checkpoint(pruned))
    assert teacher is not None
    reference = tiny_mlp()
    for name, value in reference.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], value)

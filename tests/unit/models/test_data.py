"""Every ``--data`` spec: tensors:, text:, imagefolder:, py: — loaded and used for a real step."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nmcli.commands.finetune import run_finetune
from nmcli.commands.prune import run_prune
from nmcli.errors import BackendUnavailableError, DataError
from nmcli.models.data import Batch, load_data, to_batch
from nmcli.pipelines.training import FinetuneConfig
from tests.conftest import py_source


@pytest.fixture()
def pruned(tmp_path: Path) -> Path:
    out = tmp_path / "mlp-2of4.safetensors"
    run_prune(py_source("tiny_mlp"), pattern="2:4", keep_dense=True, output=out)
    return out


def test_tensors_inputs_and_targets(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    save_file({"inputs": torch.arange(12.0).reshape(6, 2), "targets": torch.arange(6)}, str(path))
    data = load_data(f"tensors:{path}")
    assert len(data) == 6 and data.map_style
    batch = data.take([4, 1])
    assert torch.equal(batch.args[0], torch.tensor([[8.0, 9.0], [2.0, 3.0]]))
    assert torch.equal(batch.targets, torch.tensor([4, 1]))


def test_tensors_named_inputs(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    save_file(
        {"input_ids": torch.ones(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.long)},
        str(path),
    )
    batch = load_data(f"tensors:{path}").take([0, 1])
    assert set(batch.kwargs) == {"input_ids", "attention_mask"} and batch.targets is None


def test_tensors_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"tensors:{tmp_path / 'missing.safetensors'}")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="not a readable"):
        load_data(f"tensors:{bad}")
    uneven = tmp_path / "uneven.safetensors"
    save_file({"inputs": torch.zeros(4, 2), "targets": torch.zeros(3)}, str(uneven))
    with pytest.raises(DataError, match="different first dimensions"):
        load_data(f"tensors:{uneven}")
    with pytest.raises(DataError, match="unknown --data"):
        load_data("csv:foo.csv")


def test_text_uses_the_hf_tokenizer(tmp_path: Path, minilm_dir: Path) -> None:
    path = tmp_path / "lines.txt"
    path.write_text("Hi there.\n\nA much longer second line of text for padding.\n", encoding="utf-8")
    data = load_data(f"text:{path}", source_spec=f"hf:{minilm_dir}", max_length=8)
    assert len(data) == 2  # the blank line is skipped
    batch = data.take([0, 1])
    assert batch.kwargs["input_ids"].shape == (2, 8)  # truncated to --max-length, padded to the batch
    assert batch.kwargs["attention_mask"][0].sum() < 8
    with pytest.raises(DataError, match="tokenizer"):
        load_data(f"text:{path}", source_spec=py_source("tiny_mlp"))


def test_imagefolder_needs_torchvision(tmp_path: Path) -> None:
    try:
        import torchvision  # noqa: F401
    except Exception:
        with pytest.raises(BackendUnavailableError, match=r"nmcli\[vision\]"):
            load_data(f"imagefolder:{tmp_path}", input_shape=(1, 3, 8, 8))
        return
    with pytest.raises(DataError, match="input shape"):
        load_data(f"imagefolder:{tmp_path}", input_shape=None)


DATA_MODULE = textwrap.dedent(
    """
    import torch
    from torch.utils.data import TensorDataset

    def dataset():
        g = torch.Generator().manual_seed(0)
        return TensorDataset(torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g))

    def batches():
        g = torch.Generator().manual_seed(0)
        return [{"x": torch.randn(4, 64, generator=g)} for _ in range(3)]

    def with_loss():
        g = torch.Generator().manual_seed(0)
        data = [(torch.randn(8, 64, generator=g),) for _ in range(2)]
        return data, lambda outputs, targets: outputs.pow(2).mean()

    def broken():
        raise RuntimeError("boom")
    """
)


def test_py_specs(tmp_path: Path, pruned: Path) -> None:
    module = tmp_path / "mydata.py"
    module.write_text(DATA_MODULE, encoding="utf-8")
    ds = load_data(f"py:{module}:dataset")
    assert ds.map_style and len(ds) == 16
    assert ds.take([0, 1]).targets is not None
    batches = load_data(f"py:{module}:batches")
    assert not batches.map_style and len(list(batches.iter_batches())) == 3
    with_loss = load_data(f"py:{module}:with_loss")
    assert with_loss.loss is not None
    with pytest.raises(DataError, match="boom"):
        load_data(f"py:{module}:broken")
    with pytest.raises(DataError, match="no callable"):
        load_data(f"py:{module}:nothing")
    # a custom loss trains the model with no targets and no teacher
    out = tmp_path / "out.safetensors"
    cfg = FinetuneConfig(data=f"py:{module}:with_loss", teacher="none", steps=3, lr=0.01, device="cpu")
    result = run_finetune(pruned, cfg, output=out)
    assert result.steps == 3 and result.final_loss is not None
    # a map-style py: dataset with targets trains too
    cfg = FinetuneConfig(data=f"py:{module}:dataset", teacher="none", steps=2, batch_size=8, device="cpu")
    assert run_finetune(pruned, cfg, output=tmp_path / "out2.safetensors").steps == 2


def test_batch_forms_and_sharding() -> None:
    x, y = torch.arange(8.0).reshape(4, 2), torch.arange(4)
    assert to_batch(x).args[0] is x
    pair = to_batch((x, y))
    assert pair.targets is y
    named = to_batch({"input_ids": x, "targets": y})
    assert named.kwargs == {"input_ids": x} and named.targets is y
    shard = Batch((x,), {}, y).shard(1, 2)
    assert torch.equal(shard.args[0], x[2:]) and torch.equal(shard.targets, y[2:])
    with pytest.raises(DataError):
        to_batch("text")

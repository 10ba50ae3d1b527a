"""The block runner's shortcuts change nothing: replayed sub-module outputs, shared q/k/v statistics and
batches run on several workers give the same masks and weights, to the bit, as running every pass in full
on one thread (issue 24)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nmcli.pipelines.blocks as blocks
import nmcli.pipelines.frozen as frozen
from nmcli.algorithms.config import CalibrationConfig
from nmcli.formats.checkpoint import SourceRef
from nmcli.models.data import Batch
from nmcli.nm.pattern import parse_pattern
from nmcli.pipelines.blocks import PATH_BLOCKS
from nmcli.pipelines.inmemory import prune_model

P24 = parse_pattern("2:4")


def _tiny_bert() -> tuple[nn.Module, list[Batch]]:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(5):
        ids = torch.randint(1, 64, (3, 12), generator=g)
        mask = torch.ones(3, 12, dtype=torch.long)
        mask[1, 7:] = 0  # padded positions stay out of the statistics
        batches.append(Batch((), {"input_ids": ids, "attention_mask": mask}))
    return model, batches


class _Twice(nn.Module):
    """A block whose activation module runs twice on different inputs: its output must never be replayed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 8)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Twice(), _Twice()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _prune(model: nn.Module, batches: list[Batch], method: str = "sparsegpt") -> dict[str, torch.Tensor]:
    result = prune_model(
        copy.deepcopy(model), P24, source=SourceRef("py:x:y"), method=method,
        calibration=CalibrationConfig(spec="tensors:x", refit_iterations=10), batches=batches,
    )  # fmt: skip
    assert result.calibration_path == PATH_BLOCKS
    masks = {f"mask:{k}": v for k, v in result.checkpoint.masks.items()}
    return {**masks, **{k: result.checkpoint.tensors[k] for k in result.checkpoint.masks}}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_workers_and_replay_give_the_bits_of_one_thread_running_everything(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    model, batches = _tiny_bert()
    monkeypatch.setattr(blocks, "default_workers", lambda threads: 3)
    fast = _prune(model, batches, method)
    monkeypatch.setattr(blocks, "default_workers", lambda threads: 1)
    monkeypatch.setattr(frozen, "FROZEN_BYTES", 0)  # nothing kept: every pass runs the whole prefix
    slow = _prune(model, batches, method)
    assert len(fast) == 2 * 13  # 12 Linears in the blocks and the pooler
    assert not _same(fast, slow)


def test_a_module_called_twice_is_run_again_not_replayed(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    model = _Blocks().eval()
    x = torch.randn(4, 10, 8)
    batches = [Batch((x[:2],)), Batch((x[2:],))]
    kept = _prune(model, batches)
    monkeypatch.setattr(frozen, "FROZEN_BYTES", 0)
    assert not _same(kept, _prune(model, batches))


def test_replayed_outputs_are_kept_once_per_outer_module() -> None:
    """After q/k/v, o and the up projection are pruned, the down projection's pass replays the attention
    and the intermediate module whole (their inner Linears no longer run)."""
    model, batches = _tiny_bert()
    calls: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    _prune(model, batches)
    layer0 = {k.removeprefix("encoder.layer.0."): v for k, v in calls.items() if k.startswith("encoder.layer.0.")}
    probes = 3  # batch 0 runs whole three times: the fit check, the chaining probe, the grouping probe
    # each Linear runs once per batch for its pruned output, plus its group's statistics pass, which ends at
    # the first Linear of the group (k and v share q's input: never reached); not once per later group
    assert layer0 == {
        "attention.self.query": 2 * len(batches) + probes,
        "attention.self.key": len(batches) + probes,
        "attention.self.value": len(batches) + probes,
        "attention.output.dense": 2 * len(batches) + probes,
        "intermediate.dense": 2 * len(batches) + probes,
        "output.dense": 2 * len(batches) + probes,
    }


def _family(name: str) -> tuple[nn.Module, list[Batch]]:
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    models = {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**small, num_attention_heads=4, num_key_value_heads=2)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4)),
        "mixtral": lambda: t.MixtralForCausalLM(
            t.MixtralConfig(**small, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
        ),
        "t5-encoder": lambda: t.T5EncoderModel(
            t.T5Config(vocab_size=128, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16)
        ),
        "vit": lambda: t.ViTModel(
            t.ViTConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
            )
        ),
    }
    model = models[name]().eval()
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        return model, [Batch((), {"pixel_values": torch.randn(3, 3, 32, 32, generator=g)}) for _ in range(3)]
    batches = []
    for _ in range(3):
        mask = torch.ones(3, 12, dtype=torch.long)
        mask[1, 8:] = 0
        batches.append(Batch((), {"input_ids": torch.randint(3, 128, (3, 12), generator=g), "attention_mask": mask}))
    return model, batches


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral", "t5-encoder", "vit"])
def test_other_architectures_get_the_same_bits_with_workers_and_replay(
    monkeypatch: pytest.MonkeyPatch, family: str
) -> None:
    """GQA and rotary attention, Conv1D, MoE experts, blocks that do not chain (T5: stages), a vision encoder."""
    model, batches = _family(family)

    def pruned(workers: int, kept: int) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(blocks, "default_workers", lambda threads: workers)
        monkeypatch.setattr(frozen, "FROZEN_BYTES", kept)
        result = prune_model(
            copy.deepcopy(model), P24, source=SourceRef("py:x:y"), method="sparsegpt",
            calibration=CalibrationConfig(spec="tensors:x"), batches=batches,
        )  # fmt: skip
        masks = {f"mask:{k}": v for k, v in result.checkpoint.masks.items()}
        return {**masks, **{k: result.checkpoint.tensors[k] for k in result.checkpoint.masks}}

    fast, slow = pruned(3, 512 << 20), pruned(1, 0)
    assert len(fast) >= 2 * 8
    assert not _same(fast, slow)

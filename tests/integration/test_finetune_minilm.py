"""MiniLM (all-MiniLM-L6-v2) pruned 2:4 and distilled on real English text from Python's docstrings.

The mean cosine similarity between the sparse and the dense model's sentence embeddings (mean
pooling) of held-out sentences rises from its one-shot value.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fixtures.corpus import docstring_sentences, embed, mean_cosine
from nmcli.commands.finetune import run_finetune
from nmcli.commands.prune import run_prune
from nmcli.models.sources import load_model
from nmcli.pipelines.training import FinetuneConfig


def test_minilm_distillation_recovers_sentence_embeddings(tmp_path: Path, minilm_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    sentences = docstring_sentences()
    assert len(sentences) >= 2500, len(sentences)
    held_out, train = sentences[::10][:128], [s for i, s in enumerate(sentences) if i % 10]
    text = tmp_path / "train.txt"
    text.write_text("\n".join(train) + "\n", encoding="utf-8")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)

    pruned = tmp_path / "minilm-2of4.safetensors"
    run_prune(f"hf:{minilm_dir}", pattern="2:4", keep_dense=True, output=pruned)
    dense = load_model(f"hf:{minilm_dir}").model
    dense_embeddings = embed(dense, tokenizer, held_out)
    one_shot = mean_cosine(load_model(str(pruned)).model, dense_embeddings, tokenizer, held_out)

    steps = 80
    rates: list[float] = []
    cfg = FinetuneConfig(
        data=f"text:{text}", teacher="auto", steps=steps, batch_size=16, optimizer="adamw", lr=1e-4,
        warmup_steps=10, max_length=64, device="cpu",
    )  # fmt: skip
    started = time.perf_counter()
    result = run_finetune(pruned, cfg, output=tmp_path / "minilm-2of4-ft.safetensors",
                          on_step=lambda info: rates.append(info.steps_per_second))  # fmt: skip
    seconds = time.perf_counter() - started
    recovered = mean_cosine(load_model(str(result.output)).model, dense_embeddings, tokenizer, held_out)
    print(
        f"\nMiniLM 2:4 on {len(train)} docstring lines, {len(held_out)} held out: mean cosine one-shot "
        f"{one_shot:.4f} -> distilled {recovered:.4f} after {result.steps} steps "
        f"({rates[-1]:.2f} steps/s, {seconds:.0f}s; SAD vs start {result.sad_vs_start.normalized:.4f})"
    )
    assert recovered > one_shot + 0.01

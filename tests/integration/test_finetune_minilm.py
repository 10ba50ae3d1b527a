"""MiniLM (all-MiniLM-L6-v2) pruned 2:4 and distilled on real English text from Python's docstrings.

The mean cosine similarity between the sparse and the dense model's sentence embeddings (mean
pooling) of held-out sentences rises from its one-shot value.
"""

from __future__ import annotations

import importlib
import inspect
import re
import time
from pathlib import Path

import pytest
import torch

from nmcli.finetune import FinetuneConfig, run_finetune
from nmcli.prune import run_prune
from nmcli.sources import load_model

_MODULES = [
    "abc",
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "cmd",
    "codecs",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "mailbox",
    "math",
    "mimetypes",
    "netrc",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "token",
    "tokenize",
    "trace",
    "traceback",
    "turtle",
    "typing",
    "unittest",
    "urllib",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml",
    "zipfile",
    "zoneinfo",
]


def docstring_sentences() -> list[str]:
    """English sentences from the docstrings of the standard library (deterministic order, deduplicated)."""
    seen: dict[str, None] = {}
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        objects = [module, *(v for _, v in sorted(vars(module).items()) if inspect.isclass(v) or inspect.isfunction(v))]
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            text = " ".join(doc.split())
            for sentence in re.split(r"(?<=[.!?])\s+", text):
                if 40 <= len(sentence) <= 300 and sentence[0].isupper() and not re.search(r"[>{}\[\]=]", sentence):
                    seen.setdefault(sentence, None)
    return list(seen)


def _embed(model: torch.nn.Module, tokenizer: object, sentences: list[str]) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(sentences), 32):
            enc = tokenizer(sentences[i : i + 32], padding=True, truncation=True, max_length=64, return_tensors="pt")  # type: ignore[operator]
            hidden = model.eval()(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def _mean_cosine(
    model: torch.nn.Module, dense_embeddings: torch.Tensor, tokenizer: object, held_out: list[str]
) -> float:
    return float(torch.nn.functional.cosine_similarity(_embed(model, tokenizer, held_out), dense_embeddings).mean())


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
    dense_embeddings = _embed(dense, tokenizer, held_out)
    one_shot = _mean_cosine(load_model(str(pruned)).model, dense_embeddings, tokenizer, held_out)

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
    recovered = _mean_cosine(load_model(str(result.output)).model, dense_embeddings, tokenizer, held_out)
    print(
        f"\nMiniLM 2:4 on {len(train)} docstring lines, {len(held_out)} held out: mean cosine one-shot "
        f"{one_shot:.4f} -> distilled {recovered:.4f} after {result.steps} steps "
        f"({rates[-1]:.2f} steps/s, {seconds:.0f}s; SAD vs start {result.sad_vs_start.normalized:.4f})"
    )
    assert recovered > one_shot + 0.01

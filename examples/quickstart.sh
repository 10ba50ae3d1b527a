#!/usr/bin/env bash
# Quickstart: prune a small CNN to 2:4 and check the result. Run from the repository root
# after `pip install -e .`; files go to ./quickstart-out/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${QUICKSTART_OUT:-quickstart-out}"
mkdir -p "$out"

# 1. Prune every eligible layer 2:4 (the stem conv, 3 input channels, and the depthwise conv are skipped).
nmcli prune "py:$here/small_cnn.py:build" -p 2:4 --input-shape 1x3x32x32 --keep-dense \
  -o "$out/small_cnn-2of4.safetensors" --force

# 2. Check that every eligible layer is 2:4 along its input dimension (exit 1 if not).
nmcli inspect "$out/small_cnn-2of4.safetensors" --strict
echo "quickstart: wrote $out/small_cnn-2of4.safetensors"

"""Bytes on disk, torch-free at import: safetensors primitives, the nmcli/1 checkpoint and its
compressed form, sharded HF directories with their sidecar, the content checksum, training state,
torch files, the ONNX layout, and ``open.py``, the one place that decides what kind of input a path
is. Imports only ``nm`` and the base modules."""

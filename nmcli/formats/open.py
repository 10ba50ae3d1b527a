"""The one place that decides what kind of checkpoint a path is: an nmcli/1 file or a sharded
HF directory with its sidecar.
"""

from __future__ import annotations

import os
from pathlib import Path

from nmcli.formats.checkpoint import Checkpoint, CheckpointMeta, CheckpointReader, write_compressed
from nmcli.formats.sharded import is_sharded_checkpoint, sidecar_path
from nmcli.formats.sharded_checkpoint import load_sharded

# The prefixed model sources (DESIGN.md section 1); anything else names a local file or folder.
PREFIXES = ("hf:", "torchvision:", "timm:", "py:")


def load_checkpoint(path: str | os.PathLike[str], *, dense: bool = True) -> Checkpoint:
    """Read and validate an nmcli/1 checkpoint (see :meth:`CheckpointReader.load`).

    A directory in the sharded layout (:mod:`nmcli.formats.sharded`) is loaded whole, when it fits in memory.
    """
    if Path(path).is_dir() and is_sharded_checkpoint(path):
        return load_sharded(path, dense=dense)
    with CheckpointReader(path) as reader:
        return reader.load(dense=dense)


def read_meta(path: str | os.PathLike[str]) -> CheckpointMeta | None:
    """The nmcli metadata of a safetensors file or sharded checkpoint directory, or None for a plain state dict (header only)."""
    if Path(path).is_dir():
        if not is_sharded_checkpoint(path):
            return None
        path = sidecar_path(path)
    with CheckpointReader(path) as reader:
        return reader.meta


def compress_checkpoint(source: str | os.PathLike[str], path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Read an nmcli/1 checkpoint and write its compressed copy to ``path``."""
    return write_compressed(load_checkpoint(source, dense=True), path, force=force, inputs=(source,))

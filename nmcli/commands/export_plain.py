"""``nmcli export --format plain|hf`` (issue 23): a checkpoint's weights alone, for the next tool.

``plain`` is one safetensors state dict that ``load_state_dict(strict=True)`` loads; ``hf`` a
transformers folder that ``AutoModel.from_pretrained`` loads. Zeros stay exact; nothing
nmcli-specific is written (the input checkpoint keeps the masks and records).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nmcli.errors import InputError

if TYPE_CHECKING:
    pass
from nmcli.formats.checkpoint import SourceRef
from nmcli.formats.open import Form, InputKind, classify, open_checkpoint
from nmcli.formats.plain import DEFAULT_SHARD_BYTES, write_hf_directory, write_plain_state_dict
from nmcli.progress import ProgressCallback

DEFAULT_QUANT_SAMPLES = 128


PLAIN_FORMATS = ("plain", "hf")


@dataclass
class PlainExportResult:
    """What ``nmcli export --format plain|hf`` wrote.

    Attributes:
        format: ``plain`` (one safetensors state dict) or ``hf`` (a transformers folder).
        path: the file or folder written.
        files: the files in the folder (``hf``), or the file's name.
        tensors: how many tensors were written; ``zeros`` of their elements are exact zeros.
        pruned_layers: how many of them are N:M-pruned weights (their zeros kept exactly).
    """

    format: str
    path: Path
    files: list[str]
    tensors: int
    zeros: int
    pruned_layers: int
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "output": str(self.path),
            "files": self.files,
            "tensors": self.tensors,
            "zeros": self.zeros,
            "pruned_layers": self.pruned_layers,
            "notes": self.notes,
        }


def plain_export_path(checkpoint: str, fmt: str, output: str | os.PathLike[str] | None) -> Path:
    """``-o`` for ``--format plain`` (a ``.safetensors`` file) or ``hf`` (a folder); defaults beside the
    checkpoint: ``model-2of4-plain.safetensors``, ``model-2of4-hf/``.

    Raises:
        InputError: ``-o`` does not fit the format.
    """
    from nmcli.models.sources import default_output_path

    if output is None:
        return default_output_path(checkpoint, fmt, ".safetensors" if fmt == "plain" else "")
    out = Path(output)
    if fmt == "plain" and out.suffix.lower() != ".safetensors":
        raise InputError(f"-o {out}: --format plain writes one safetensors file: give a path ending in .safetensors")
    if fmt == "hf" and out.suffix.lower() in (".safetensors", ".onnx", ".engine", ".pt", ".bin"):
        raise InputError(f"-o {out}: --format hf writes a transformers folder: give a folder name")
    return out


def _hf_source_folder(kind: InputKind, source: SourceRef, arch: str | None) -> Path:
    """The local transformers folder whose config and tokenizer a ``--format hf`` output copies.

    The checkpoint's recorded source is a hint, never a path it may choose: its folder is used only
    while the folder's weights (or config) still have the sha256 the checkpoint recorded, so an
    edited checkpoint cannot copy files from a folder of its choosing into the output; ``--arch``
    (the user's own word) is used as given.

    Raises:
        InputError: neither the checkpoint, its recorded source nor ``--arch`` is a local transformers folder.
    """
    from nmcli.models.sources import source_ref

    source_spec = source.spec
    if kind.form is Form.SHARDED_CHECKPOINT and kind.path is not None:
        return kind.path
    if arch and arch.startswith("hf:") and (Path(arch[3:]) / "config.json").is_file():
        return Path(arch[3:])
    if source_spec.startswith("hf:") and (Path(source_spec[3:]) / "config.json").is_file():
        if source.sha256 is not None and source_ref(source_spec).sha256 == source.sha256:
            return Path(source_spec[3:])
        raise InputError(
            f"{kind.spec} records its source as {source_spec}, whose files no longer have the sha256 it "
            "recorded: pass --arch hf:DIR naming the model's folder to copy its config and tokenizer from"
        )
    raise InputError(
        f"--format hf copies the config and tokenizer of a local transformers folder, and {kind.spec} was "
        f"pruned from {source_spec}: pass --arch hf:DIR naming the model's folder (or use --format plain)"
    )


def run_plain_export(
    checkpoint: str,
    *,
    fmt: str,
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    arch: str | None = None,
    progress: ProgressCallback | None = None,
    max_shard_bytes: int | None = None,
) -> PlainExportResult:
    """``nmcli export --format plain|hf``: the checkpoint's effective weights with no nmcli records.

    ``plain`` loads with ``model.load_state_dict(safetensors.torch.load_file(OUT), strict=True)``;
    ``hf`` with ``AutoModel.from_pretrained(DIR)``. Pruned zeros stay exact zeros; masks, dense
    copies and the ``nmcli`` metadata are left out (the input checkpoint keeps them).

    Raises:
        InputError: not an nmcli checkpoint, a bad ``-o``, or (``hf``) no local transformers folder to copy from.
        OutputExistsError: the output exists without ``force``.
    """
    if fmt not in PLAIN_FORMATS:
        raise InputError(f"--format {fmt}: choose onnx, plain or hf")
    kind = classify(checkpoint)
    if kind.path is None or not kind.is_checkpoint:
        raise InputError(
            f"--format {fmt} writes the weights of an nmcli checkpoint (a .safetensors from nmcli prune or "
            f"finetune, or a sharded checkpoint folder): {checkpoint} is not one; prune it first"
        )
    out = plain_export_path(checkpoint, fmt, output)
    with open_checkpoint(kind) as reader:
        if not reader.is_nmcli:
            raise InputError(f"{checkpoint} is already a plain state dict (no nmcli records): nothing to strip")
        ckpt = reader.load(dense=False)
    if progress is not None:
        progress(0, 1, f"writing {out}")
    tensors = ckpt.tensors
    if fmt == "plain":
        write_plain_state_dict(tensors, out, force=force, inputs=[kind.path])
        files = [out.name]
    else:
        folder = _hf_source_folder(kind, ckpt.meta.source, arch)
        files = write_hf_directory(
            tensors,
            folder,
            out,
            max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES,
            force=force,
            inputs=[kind.path],
        )
    if progress is not None:
        progress(1, 1, "done")
    zeros = sum(int((v == 0).sum()) for v in tensors.values() if v.is_floating_point())
    return PlainExportResult(fmt, out, files, len(tensors), zeros, len(ckpt.meta.layers))

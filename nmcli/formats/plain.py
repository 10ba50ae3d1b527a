"""Plain outputs for the next tool: a bare state dict, or a plain Hugging Face folder (``export --format``).

An nmcli/1 file carries ``__nmcli__/`` masks and metadata that ``load_state_dict(strict=True)``
refuses; these writers keep only the model's own tensors (the effective weights, exact zeros
where pruned) under their own names, with the metadata every safetensors loader expects
(``{"format": "pt"}``, which transformers requires) and nothing nmcli-specific:

* :func:`write_plain_state_dict`: one ``.safetensors`` file, loadable by ``safetensors.torch.load_file``
  and ``model.load_state_dict(..., strict=True)``;
* :func:`write_hf_directory`: ``config.json``, the tokenizer and other side files copied from the
  source folder, and the weights as ``model.safetensors`` or transformers' shards
  (``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``), which
  ``AutoModel.from_pretrained`` loads. No sidecar.

Torch-free at import; the tensors come from the caller (torch tensors, CPU).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from nmcli.errors import CheckpointError
from nmcli.formats.safetensors import write_safetensors
from nmcli.formats.sharded import INDEX, SINGLE, atomic_directory, copy_side_files
from nmcli.io import atomic_output

if TYPE_CHECKING:
    import torch

PLAIN_METADATA = {"format": "pt"}
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' own default max_shard_size ("5GB")
RESERVED_PREFIX = "__nmcli__/"


def _plain(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, no nmcli names (a caller's bug if any is left)."""
    out = {}
    for name, value in tensors.items():
        if name.startswith(RESERVED_PREFIX):
            raise CheckpointError(f"plain output: {name!r} is an nmcli record, not a model tensor")
        out[name] = value.detach().to("cpu").contiguous()
    return out


def write_plain_state_dict(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Write ``tensors`` as a plain safetensors state dict at ``path``, atomically.

    Raises:
        OutputExistsError: ``path`` exists without ``force``, or is one of ``inputs``.
        OutputWriteError: the OS refused the write.
    """
    payload = _plain(tensors)
    with atomic_output(path, force=force, inputs=inputs) as tmp:
        write_safetensors(payload, tmp, PLAIN_METADATA)
    return Path(path)


def shard_plan(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most ``max_bytes`` each (a bigger tensor alone), in order."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_hf_directory(
    tensors: Mapping[str, torch.Tensor],
    source: Path | None,
    out: str | os.PathLike[str],
    *,
    config: Mapping[str, object] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> list[str]:
    """Write a plain transformers folder at ``out``: side files of ``source`` (config, tokenizer),
    ``config`` as ``config.json`` when the source folder has none, and the weights sharded as
    transformers does. Returns the names written, sorted.

    Raises:
        OutputExistsError: ``out`` exists without ``force`` (or is not a folder nmcli may replace).
        OutputWriteError: the OS refused the write.
        SourceError: a side file of ``source`` links outside it.
    """
    payload = _plain(tensors)
    sizes = {name: value.numel() * value.element_size() for name, value in payload.items()}
    plan = shard_plan(sizes, max_shard_bytes)
    with atomic_directory(out, force=force, inputs=list(inputs)) as tmp:
        if source is not None:
            copy_side_files(source, tmp)
        if config is not None and not (tmp / "config.json").exists():
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if len(plan) == 1:
            write_safetensors(payload, tmp / SINGLE, PLAIN_METADATA)
        else:
            weight_map = {}
            for i, names in enumerate(plan, 1):
                file = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
                write_safetensors({n: payload[n] for n in names}, tmp / file, PLAIN_METADATA)
                weight_map.update(dict.fromkeys(names, file))
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return sorted(p.name for p in tmp.iterdir())

"""Meta-device loading for ``finetune --shard fsdp``: no rank ever holds the whole model (issue 22).

The checkpoint's architecture is built with every parameter on the **meta** device
(:func:`~nmcli.models.skeleton.parameters_on_meta`: buffers computed at construction, such as rotary
frequencies, stay real), put under SR-STE and ``fully_shard`` there, and only then materialized:
``to_empty`` gives each rank uninitialised memory for its own shards, and :func:`fill_from_files`
fills them tensor by tensor from the files, reading only the rank's rows of each weight
(``safe_open(...).get_slice(name)[start:stop]``). A rank's peak is about its shards plus one tensor.
Buffers the files do not hold are the ones the constructor computed, copied back after ``to_empty``;
every parameter and buffer is checked filled, so no uninitialised memory is ever trained on.

Inputs: a single-file nmcli/1 checkpoint or a sharded checkpoint directory (HF shards + sidecar),
not compressed (``nmcli export --compress`` output is decoded whole: the eager path loads it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmcli.errors import CheckpointError, SourceError
from nmcli.formats.checkpoint import DENSE_PREFIX, Checkpoint, CheckpointMeta
from nmcli.formats.open import open_checkpoint
from nmcli.formats.sharded import ShardedModel, is_sharded_checkpoint, sidecar_path
from nmcli.models.skeleton import parameters_on_meta
from nmcli.models.sources import eval_mode, rebuild_architecture
from nmcli.nm.bits import pack_mask, unpack_mask


class PackedMasks(Mapping[str, torch.Tensor]):
    """Boolean masks kept bit-packed (1 bit per weight), each unpacked when it is read.

    The meta path's starting masks: held for the whole run (SAD against the start at the end), they
    would otherwise cost every rank 1 byte per pruned weight on top of the SR-STE mask buffers.
    """

    def __init__(self, packed: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._packed = dict(packed)
        self._shapes = dict(shapes)

    @classmethod
    def pack(cls, masks: Mapping[str, torch.Tensor]) -> PackedMasks:
        """The packed form of boolean ``masks``."""
        return cls({k: pack_mask(v).numpy() for k, v in masks.items()}, {k: tuple(v.shape) for k, v in masks.items()})

    def __getitem__(self, name: str) -> torch.Tensor:
        return unpack_mask(self._packed[name], self._shapes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def renamed(self, rename: Callable[[str], str]) -> PackedMasks:
        """The same masks, still packed, under the names ``rename`` gives."""
        return PackedMasks(
            {rename(k): v for k, v in self._packed.items()}, {rename(k): v for k, v in self._shapes.items()}
        )


@dataclass
class StoredCheckpoint:
    """What the meta path reads of a checkpoint up front: its metadata and packed masks, not its tensors.

    ``header`` is a :class:`Checkpoint` with the metadata and no tensors or masks, for the code that
    reads those (history, layers); the masks are ``masks``, the tensors stay in the files at ``path``.
    """

    path: Path
    header: Checkpoint
    masks: PackedMasks
    dense_names: set[str] = field(default_factory=set)


def read_stored(path: str | os.PathLike[str]) -> StoredCheckpoint | None:
    """The metadata, packed masks and dense-weight names of an nmcli checkpoint; None when it is compressed.

    Raises:
        CheckpointError: unreadable, a plain state dict, or masks that do not fit their layer entries.
    """
    with open_checkpoint(path) as reader:
        if reader.compressed:
            return None
        meta = getattr(reader, "meta", None)
        if not isinstance(meta, CheckpointMeta):
            raise CheckpointError(f"{path} is a plain state dict, not an nmcli checkpoint: prune it first")
        missing = [e.param for e in meta.layers if e.param not in set(reader.mask_names)]
        if missing:
            raise CheckpointError(f"{path}: layer {missing[0]} has no stored mask: re-create the checkpoint")
        try:
            packed = {e.param: reader.packed_mask_array(e.param).copy() for e in meta.layers}
            masks = PackedMasks(packed, {e.param: e.shape for e in meta.layers})
            for entry in meta.layers:
                masks[entry.param]  # unpacked once: a mask of the wrong size is refused here
        except Exception as exc:
            raise CheckpointError(f"{path}: a mask could not be read ({exc}): re-create the checkpoint") from exc
        header = Checkpoint(tensors={}, masks={}, meta=meta, dense={})
        return StoredCheckpoint(Path(path), header, masks, set(reader.dense_names))


def meta_model(meta: CheckpointMeta, *, arch: str | None, trust: bool, model_class: str = "auto") -> nn.Module:
    """The checkpoint's architecture with every parameter on the meta device (buffers real), eval mode
    (``model_class``: the user's ``--model-class``, see :func:`~nmcli.models.sources.rebuild_architecture`)."""
    with parameters_on_meta():
        model = rebuild_architecture(meta.source, arch=arch, trust=trust, model_class=model_class)
    return eval_mode(model)


class TensorRows:
    """Stored tensors of a checkpoint, read whole or a range of rows at a time (safetensors slices).

    Each read opens its file and closes it again, so the pages read leave the process with the
    tensor (its resident memory stays near one tensor).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._files: dict[str, Path] = {}
        if is_sharded_checkpoint(path):
            model = ShardedModel.open(path)
            self._files = {name: path / info.file for name, info in model.tensors.items()}
            sidecar = sidecar_path(path)
            with open_checkpoint(sidecar) as reader:
                for name in reader.dense_names:
                    self._files[DENSE_PREFIX + name] = sidecar
        else:
            with open_checkpoint(path) as reader:
                for name in [*reader.state_names, *(DENSE_PREFIX + n for n in reader.dense_names)]:
                    self._files[name] = path

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def __iter__(self) -> Iterator[str]:
        """The stored names (state-dict tensors, and dense weights under ``__nmcli__/dense/``)."""
        return iter(self._files)

    def shape(self, key: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(str(self._files[key]), framework="pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def rows(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``key`` (all of it by default; a 0-d tensor whole).

        Raises:
            CheckpointError: the file cannot be read (truncated, replaced).
        """
        from safetensors import safe_open

        file = self._files[key]
        try:
            with safe_open(str(file), framework="pt") as handle:
                part = handle.get_slice(key)
                if start is None or not part.get_shape():
                    return handle.get_tensor(key)
                return part[start:stop]
        except Exception as exc:
            raise CheckpointError(f"{file}: tensor {key} could not be read ({exc}): re-create the checkpoint") from exc


def stored_name(name: str) -> str:
    """The state-dict name of a parameter under ``torch.nn.utils.parametrize``: ``a.parametrizations.weight.original``
    is ``a.weight`` (other names unchanged)."""
    head, sep, tail = name.partition("parametrizations.")
    if not sep or (head and not head.endswith(".")):
        return name
    attr, _, rest = tail.partition(".")
    return head + attr if rest == "original" else name


def _candidates(name: str, prefix: str, dense: bool) -> list[str]:
    """File keys that may hold the tensor the model calls ``name`` (dense weights first, base-model prefix either way)."""
    names = [
        name,
        f"{prefix}.{name}" if prefix else "",
        name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else "",
    ]
    names = [n for n in names if n]
    return [DENSE_PREFIX + n for n in names] + names if dense else names


def _is_sharded(tensor: torch.Tensor) -> bool:
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def _local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """This rank's piece of a dim-0-sharded DTensor and its rows ``start:stop`` (FSDP2 chunks like ``torch.chunk``)."""
    local: torch.Tensor = tensor.to_local()  # type: ignore[attr-defined]
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    chunk = -(-tensor.shape[0] // mesh.size())
    start = min(mesh.get_local_rank() * chunk, tensor.shape[0])
    return local, start, start + local.shape[0]


def _fill_parameter(param: torch.Tensor, names: list[str], rows: TensorRows, prefix: str, what: str) -> str | None:
    """Copy one parameter (this rank's rows of a sharded one) from the files; the key read, or None when absent."""
    for name in names:
        for key in _candidates(stored_name(name), prefix, dense=True):
            if key not in rows:
                continue
            if rows.shape(key) != tuple(param.shape):
                raise SourceError(
                    f"{what}: {key} has shape {rows.shape(key)} in the files and {tuple(param.shape)} in the "
                    "architecture: check --arch"
                )
            with torch.no_grad():
                if _is_sharded(param):
                    local, start, stop = _local_rows(param)
                    if stop > start:
                        local.copy_(rows.rows(key, start, stop).to(local.dtype))
                else:
                    param.copy_(rows.rows(key).to(param.dtype))
            return key
    return None


def fill_from_files(
    model: nn.Module,
    rows: TensorRows,
    computed: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    what: str,
) -> None:
    """Fill a model whose storage ``to_empty`` just allocated: parameters (local rows of sharded ones) from
    the files (dense weights where stored, else the state-dict tensors), buffers from the files, else from
    ``computed`` (what the constructor computed), SR-STE mask buffers from ``masks``.

    Args:
        model: the materialized model (possibly FSDP2-sharded, under SR-STE parametrizations).
        rows: the checkpoint's tensors.
        computed: the buffers as built, by name, taken before ``to_empty``.
        masks: the full masks by parameter name (each rank keeps whole masks: the forward needs them).
        what: the checkpoint, for messages.

    Raises:
        SourceError: a parameter or buffer neither the files nor the constructor give, or a shape mismatch.
    """
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    aliases: dict[int, list[str]] = {}
    params: dict[int, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
        params[id(param)] = param
    missing = [
        names[0] for pid, names in aliases.items() if _fill_parameter(params[pid], names, rows, prefix, what) is None
    ]
    for name, buffer in model.named_buffers(remove_duplicate=False):
        module_name, _, attr = name.rpartition(".")
        if attr == "mask" and ".parametrizations." in f".{module_name}":
            owner = stored_name(module_name.rpartition(".")[0] + ".original")
            if owner in masks:
                buffer.copy_(masks[owner].to(buffer.device, torch.bool))
                continue
        keys = [k for k in _candidates(name, prefix, dense=False) if k in rows]
        with torch.no_grad():
            if keys:
                buffer.copy_(rows.rows(keys[0]).to(buffer.dtype))
            elif name in computed:
                buffer.copy_(computed[name])
            else:
                missing.append(name)
    if missing:
        shown = ", ".join(stored_name(n) for n in missing[:3])
        raise SourceError(
            f"{what} does not fit the architecture (missing {shown}{' ...' if len(missing) > 3 else ''}): check --arch"
        )


def real_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers that are not on the meta device, by name (what the constructor computed): taken before ``to_empty``."""
    return {name: b for name, b in model.named_buffers(remove_duplicate=False) if b.device.type != "meta"}


def materialize(
    model: nn.Module,
    rows: TensorRows,
    masks: Mapping[str, torch.Tensor],
    device: torch.device,
    what: str,
) -> None:
    """``to_empty`` a (sharded) meta model on ``device`` and fill it from the files (:func:`fill_from_files`).

    Tied parameters (a head sharing the embedding) stay one parameter: ``to_empty`` alone would untie them.
    """
    computed = {name: b.detach().clone() for name, b in real_buffers(model).items()}
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((module, attr))
    model.to_empty(device=device)
    for group in holders.values():  # to_empty gives each holder of a tied parameter its own copy: tie them again
        primary = group[0][0]._parameters[group[0][1]]
        for module, attr in group[1:]:
            module._parameters[attr] = primary
    fill_from_files(model, rows, computed, masks, what)

"""A fine-tuned model written as a sharded checkpoint directory, streamed one tensor at a time (issue 22).

The layout is the input directory's (:mod:`nmcli.formats.sharded`, what ``nmcli prune hf:DIR -o DIR``
writes): the same shard files, tensor names, dtypes and shapes with the new effective weights, the
index, ``config.json`` and tokenizer copied, and the ``nmcli.safetensors`` sidecar with the packed
masks, the dense weights (fp32, for resuming or a second run) and the metadata. Tensors arrive from an
iterator (:meth:`~nmcli.algorithms.srste.SparseTraining.iter_state`: under FSDP2 each one gathered
when reached) and are written at their offsets and freed, so the writing process never holds the
whole model. The directory is built as ``OUT.tmp-*`` and renamed into place when complete.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from nmcli.errors import CheckpointError
from nmcli.formats.checkpoint import (
    DENSE_PREFIX,
    MASK_PREFIX,
    CheckpointMeta,
    SourceRef,
    raise_problems,
    validate_checkpoint,
)
from nmcli.formats.safetensors import safetensors_dtype
from nmcli.formats.sharded import (
    SIDECAR,
    OutputShards,
    ShardedModel,
    ShardReader,
    SidecarWriter,
    atomic_directory,
    copy_side_files,
    is_sharded_checkpoint,
    sidecar_metadata,
    write_index,
)
from nmcli.nm.bits import pack_mask

_DTYPES = (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool,
)  # fmt: skip
_BY_CODE = {safetensors_dtype(d): d for d in _DTYPES}


def is_directory_output(source: Path, out: Path) -> bool:
    """Whether a run on ``source`` writes a sharded directory at ``out``: the input is a sharded checkpoint
    directory and ``out`` does not name a ``.safetensors`` file (which keeps the single-file nmcli/1 output)."""
    return is_sharded_checkpoint(source) and not out.name.endswith(".safetensors")


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """Every name but the first of each parameter the model holds under several names (a tied LM head)."""
    seen: dict[int, str] = {}
    aliases: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.setdefault(id(param), name)
    return aliases


def write_directory(
    out: Path,
    source: Path,
    state: Iterable[tuple[str, torch.Tensor]],
    dense: Iterable[tuple[str, torch.Tensor]],
    masks: Mapping[str, torch.Tensor],
    meta: CheckpointMeta,
    *,
    skip: set[str],
    inputs: list[Path],
) -> Path:
    """Write the sharded checkpoint ``out`` in ``source``'s layout, streaming ``state`` and ``dense``.

    Args:
        out: the output directory (replaced when it is an nmcli sharded checkpoint; checked before the run).
        source: the input sharded checkpoint directory whose layout, index and side files the output takes.
        state: ``(name, effective tensor)`` pairs, each written at its offset and dropped.
        dense: ``(name, dense weight)`` pairs for the sidecar (empty: ``--no-dense``).
        masks: the final masks by parameter name.
        meta: the output's metadata (layers, history).
        skip: state names the layout need not hold (tied aliases stored once).
        inputs: paths the output must never be.

    Raises:
        CheckpointError: a tensor the layout does not hold, or one it holds that never came.
        OutputExistsError, OutputWriteError: the output cannot be written.
    """
    layout = ShardedModel.open(source)
    with atomic_directory(out, force=True, inputs=inputs) as tmp:
        copy_side_files(source, tmp)
        shards = OutputShards(layout, tmp)
        sidecar = SidecarWriter(tmp / SIDECAR, reserve=16384 + 1024 * len(meta.layers))
        try:
            for name, value in _in_layout(state, layout, skip):
                if name in masks:  # the format's own checks, one layer at a time
                    one = CheckpointMeta(source=SourceRef(spec=""), layers=[meta.layer(name)])
                    raise_problems(name, validate_checkpoint({name: value}, {name: pack_mask(masks[name])}, {}, one))
                shards.put(name, value)
            _copy_unowned(layout, shards)
            shards.finish()
            for entry in meta.layers:
                sidecar.add(MASK_PREFIX + entry.param, pack_mask(masks[entry.param]))
            for name, value in dense:
                sidecar.add(DENSE_PREFIX + name, value)
            write_index(layout, tmp)
            sidecar.finish(sidecar_metadata(meta))
        finally:
            shards.close()
            sidecar.close()
    return out


def _copy_unowned(layout: ShardedModel, shards: OutputShards) -> None:
    """Copy, as they are, the stored tensors the model does not keep (an older file's non-persistent
    ``embeddings.position_ids``): the state streamed every tensor the model owns, so what is left is
    not the model's to change."""
    pending = shards.pending
    if not pending:
        return
    reader = ShardReader(layout)
    try:
        for name in pending:
            shards.put(name, reader.tensor(name))
    finally:
        reader.close()


def _in_layout(
    state: Iterable[tuple[str, torch.Tensor]], layout: ShardedModel, skip: set[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors the layout holds, each in its stored dtype; names it does not hold must be in ``skip``."""
    for name, value in state:
        info = layout.tensors.get(name)
        if info is None:
            if name in skip:
                continue
            raise CheckpointError(f"the fine-tuned model has a tensor {name} that the input's shards do not hold")
        dtype = _BY_CODE.get(info.dtype)
        if dtype is None:
            raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}, which nmcli cannot write")
        yield name, value.to(dtype)


def drain(*streams: Iterable[object]) -> None:
    """Run streams to their end without keeping anything: the ranks that only take part in the gathers."""
    for stream in streams:
        for _ in stream:
            pass

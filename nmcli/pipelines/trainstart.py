"""Where SR-STE fine-tuning starts: the model (whole, or a meta-device skeleton), masks, teacher and resume state.

The eager path builds and loads the whole model on every process. Under ``--shard fsdp`` the meta
path (:mod:`nmcli.pipelines.materialize`) reads only the checkpoint's metadata and masks here; the
model is a skeleton that each rank fills with its own shards once it is sharded.

Training runs under the model's own names; the checkpoint's may carry a base-model prefix the model
lacks (a base model pruned from files saved with a head: :mod:`nmcli.models.statenames`). ``Start``
holds the masks under the model's names and the mapping (``names``) that writes the output back
under the checkpoint's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmcli.errors import InputError, NmcliError, SourceError, TrustRequiredError
from nmcli.formats.checkpoint import Checkpoint
from nmcli.formats.open import load_checkpoint
from nmcli.formats.trainstate import load_trainstate, trainstate_path
from nmcli.models.batchnorm import restore_buffers
from nmcli.models.sources import eval_mode, load_model, load_source_model, model_from_checkpoint
from nmcli.models.statenames import StoredNames
from nmcli.pipelines.materialize import PackedMasks, StoredCheckpoint, TensorRows, meta_model, read_stored

# Options that must not change between a run and its --resume.
RESUME_KEYS = (
    "data", "batch_size", "grad_accum", "optimizer", "schedule", "ste", "mask_interval", "seed", "bn", "eval_split",
    "shard",
)  # fmt: skip


def load_teacher(
    spec: str, ckpt: Checkpoint, *, arch: str | None = None, trust: bool = False, model_class: str = "auto"
) -> nn.Module | None:
    """The teacher for ``--teacher auto|none|MODEL``.

    ``auto`` is the dense model the checkpoint came from: its stored dense weights when it has them
    and was never fine-tuned, else its source rebuilt with the source's own weights. ``model_class``
    (``--model-class``) is the class of an ``hf:`` MODEL or ``arch``.
    """
    if spec == "none":
        return None
    if spec != "auto":
        return frozen(load_model(spec, trust=trust, model_class=model_class).model)
    if ckpt.dense and not _finetuned(ckpt):
        return frozen(_dense_of(ckpt, arch, trust, model_class))
    ref = ckpt.meta.source
    try:
        loaded = load_source_model(ref, arch=arch, trust=trust, model_class=model_class)
    except TrustRequiredError:
        raise  # the recorded source is code: the refusal names the flag to add
    except NmcliError as exc:
        if ckpt.dense:
            return frozen(_dense_of(ckpt, arch, trust, model_class))
        raise SourceError(
            f"--teacher auto cannot rebuild the dense model from {ref.spec} ({exc}); "
            "pass --teacher MODEL, or --teacher none to train on targets alone"
        ) from exc
    if loaded.checkpoint is not None:
        raise SourceError(
            f"--teacher auto: the source {ref.spec} is itself a sparse checkpoint: pass --teacher MODEL or none"
        )
    return frozen(loaded.model)


def _dense_of(ckpt: Checkpoint, arch: str | None, trust: bool, model_class: str) -> nn.Module:
    return model_from_checkpoint(ckpt, arch=arch, trust=trust, weights="dense", model_class=model_class)


def frozen(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with no parameter needing gradients (a teacher)."""
    model = eval_mode(model)  # a torch.export teacher refuses eval(): it runs as exported
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass
class Start:
    """Where training starts: the model with its dense weights, masks, history and step."""

    model: nn.Module
    masks: Mapping[str, torch.Tensor]
    start_masks: Mapping[str, torch.Tensor]
    history: list[dict[str, Any]]
    step: int
    teacher_ckpt: Checkpoint
    state: dict[str, Any] | None = None
    rows: TensorRows | None = None  # meta path: the model is a skeleton to fill from these files
    teacher_stored: StoredCheckpoint | None = None  # meta path: the checkpoint an ``auto`` teacher comes from
    teacher_rows: TensorRows | None = None  # meta path: the teacher is a skeleton to fill from these files
    names: StoredNames = field(default_factory=StoredNames)  # model -> checkpoint names (masks: the model's)


def load_start(
    start: Checkpoint, resume_from: Path | None, out: Path, options: Mapping[str, Any], arch: str | None, trust: bool,
    model_class: str = "auto",
) -> Start:  # fmt: skip
    """Where an eager run starts: the whole model built and loaded from the checkpoint (or the partial one).

    The resume state holds its masks under the model's names (as training does)."""
    if resume_from is None:
        model = _dense_of(start, arch, trust, model_class)
        names = StoredNames.of(model, start.tensors)
        masks = names.model_state(start.masks)
        return Start(model, masks, masks, list(start.meta.history), 0, start, names=names)
    state = resume_state(resume_from, options)
    partial = load_checkpoint(resume_from)
    model = _dense_of(partial, arch, trust, model_class)
    if state.get("train_buffers"):
        restore_buffers(model, state["train_buffers"])  # the statistics before the save's re-estimation
    teacher_ckpt = start if resume_from == out else partial
    return Start(
        model, state["masks"], state["start_masks"], list(state["history"]), int(state["step"]), teacher_ckpt, state,
        names=StoredNames.of(model, partial.tensors),
    )  # fmt: skip


def resume_state(resume_from: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """The training state beside a partial checkpoint, checked to be of a run with the same ``options``.

    Raises:
        InputError: a :data:`RESUME_KEYS` option differs from the interrupted run's.
    """
    state = load_trainstate(trainstate_path(resume_from))
    changed = [k for k in RESUME_KEYS if state["config"].get(k) != options.get(k)]
    if changed:
        raise InputError(
            f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} differ(s) from the "
            "interrupted run: use the same options to resume"
        )
    return state


def open_start(path: Path, *, shard: str) -> tuple[Checkpoint, StoredCheckpoint | None]:
    """The starting checkpoint: loaded whole, or (``--shard fsdp`` under torchrun, not compressed) only its
    metadata and masks, for the meta path.

    Raises:
        CheckpointError: unreadable or invalid. InputError: loaded whole and it does not fit in memory.
    """
    if shard == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        stored = read_stored(path)
        if stored is not None:
            return stored.header, stored
    return load_checkpoint(path), None


def meta_start(
    stored: StoredCheckpoint, resume_from: Path | None, out: Path, options: Mapping[str, Any], arch: str | None,
    trust: bool, model_class: str = "auto",
) -> Start:  # fmt: skip
    """Where a meta-path run starts: the architecture on the meta device and the files to fill it from
    (the partial checkpoint's when resuming; the sharded resume state then replaces its weights)."""
    start = stored.header
    if resume_from is None:
        model = meta_model(start.meta, arch=arch, trust=trust, model_class=model_class)
        rows = TensorRows(stored.path)
        names = StoredNames.of(model, rows)
        masks = stored.masks.renamed(names.model)
        return Start(model, masks, masks, list(start.meta.history), 0, start, None, rows, stored, names=names)
    state = resume_state(resume_from, options)
    partial = read_stored(resume_from)
    if partial is None:
        raise InputError(f"--resume: {resume_from} is compressed, not a partial checkpoint: run again without --resume")
    model = meta_model(partial.header.meta, arch=arch, trust=trust, model_class=model_class)
    teacher = stored if resume_from == out else partial
    masks, start_masks = PackedMasks.pack(state.pop("masks")), PackedMasks.pack(state.pop("start_masks"))
    rows = TensorRows(resume_from)
    return Start(
        model, masks, start_masks, list(state["history"]), int(state["step"]), teacher.header, state, rows, teacher,
        names=StoredNames.of(model, rows),
    )  # fmt: skip


def meta_teacher(
    spec: str, begin: Start, *, arch: str | None, trust: bool, model_class: str = "auto"
) -> tuple[nn.Module | None, TensorRows | None]:
    """The teacher of a meta-path run, and the files to fill it from when it is a skeleton too.

    ``auto`` with the checkpoint's dense weights (never fine-tuned) is a skeleton filled from them; any
    other teacher is loaded whole (:func:`load_teacher`) and sharded after.
    """
    stored = begin.teacher_stored
    if spec == "auto" and stored is not None and stored.dense_names and not _finetuned(stored.header):
        teacher = meta_model(stored.header.meta, arch=arch, trust=trust, model_class=model_class)
        return frozen(teacher), TensorRows(stored.path)
    return load_teacher(spec, begin.teacher_ckpt, arch=arch, trust=trust, model_class=model_class), None


def _finetuned(ckpt: Checkpoint) -> bool:
    return any(record.get("command") == "finetune" for record in ckpt.meta.history)

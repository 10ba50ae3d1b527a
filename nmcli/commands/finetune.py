"""``nmcli finetune``: the command logic behind the CLI."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from nmcli.errors import (
    InputError,
)
from nmcli.formats.open import Form, classify
from nmcli.formats.safetensors import sha256_file
from nmcli.formats.sharded import check_output_directory, is_sharded_checkpoint
from nmcli.formats.trainstate import load_trainstate, trainstate_path
from nmcli.io import check_output_path
from nmcli.models.batchnorm import has_batchnorm
from nmcli.models.data import check_data_spec
from nmcli.models.hfclass import check_recorded_class
from nmcli.models.sources import (
    default_output_path,
)
from nmcli.pipelines.sad import compare_masks
from nmcli.pipelines.shardedout import is_directory_output
from nmcli.pipelines.training import (
    EvalCallback,
    FinetuneConfig,
    FinetuneResult,
    Session,
    StepCallback,
    evaluate_session,
    init_distributed,
    save_progress,
    setup_session,
    train_loop,
)
from nmcli.pipelines.trainstart import open_start


def _partial_of(candidate: Path, input_sha: str) -> bool:
    """Whether ``candidate`` is a partial checkpoint (with its sidecar) of a run on the input with ``input_sha``."""
    sidecar = trainstate_path(candidate)
    if not ((candidate.is_file() or is_sharded_checkpoint(candidate)) and sidecar.is_file()):
        return False
    with contextlib.suppress(InputError):
        state = load_trainstate(sidecar)
        return state.get("input_sha256") in (None, input_sha)
    return False


def _resume_source(out: Path, ckpt_path: Path, force: bool) -> Path | None:
    """The partial checkpoint ``--resume`` continues from; None to start afresh (an unrelated ``out`` with ``force``)."""
    input_sha = sha256_file(ckpt_path)
    same = out.resolve() == ckpt_path.resolve()
    if _partial_of(out, input_sha) or (same and trainstate_path(out).is_file()):
        return out
    if out.exists() and not force:
        raise InputError(
            f"--resume: {out} exists and is not a partial checkpoint of this run (no {trainstate_path(out).name} "
            f"from an interrupted run on {ckpt_path}): choose another -o, or add --force to overwrite it with a new run"
        )
    if trainstate_path(ckpt_path).is_file():
        return ckpt_path
    if out.exists():  # --force: a fresh run replaces the unrelated file
        return None
    raise InputError(
        f"--resume: no resumable checkpoint ({out} with {trainstate_path(out).name}): "
        "run without --resume (use --save-every N to write resumable checkpoints)"
    )


def _default_output(ckpt_path: Path) -> Path:
    """``X-ft.safetensors`` beside an nmcli/1 file; the directory ``X-ft`` beside a sharded checkpoint directory."""
    if is_sharded_checkpoint(ckpt_path):
        return default_output_path(str(ckpt_path), "ft", suffix="")
    return default_output_path(str(ckpt_path), "ft")


def finetune_config(options: Mapping[str, Any]) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of a command line's options: one option per field, by name (others ignored).

    Raises:
        KeyError: ``options`` lacks one of the fields.
    """
    return FinetuneConfig(**{f.name: options[f.name] for f in fields(FinetuneConfig)})


def run_finetune(
    checkpoint: str | os.PathLike[str],
    config: FinetuneConfig,
    *,
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    arch: str | None = None,
    trust: bool = False,
    resume: bool = False,
    on_step: StepCallback | None = None,
    on_eval: EvalCallback | None = None,
    model_class: str = "auto",
) -> FinetuneResult:
    """``nmcli finetune``: train the checkpoint's sparse model with SR-STE and write the result.

    Args:
        checkpoint: the nmcli/1 checkpoint (file, or sharded checkpoint directory) to start from.
        config: the run's options.
        output: the output checkpoint (default ``<checkpoint>-ft.safetensors`` beside it; for a sharded
            directory input, the sharded directory ``<checkpoint>-ft`` in its layout unless ``output``
            names a ``.safetensors`` file).
        force: overwrite an existing output (with ``resume``: one that is not a partial checkpoint of this run).
        arch: architecture source overriding the checkpoint's.
        trust: allow unpickling a pickled-module source.
        resume: continue from the partial checkpoint at ``output`` (or ``checkpoint``) and its sidecar.
        on_step: called on rank 0 after every optimizer step; raising KeyboardInterrupt in it
            stops the run at that step, like Ctrl-C does.
        on_eval: called on rank 0 with ``(step, metrics)`` after every ``eval_every`` evaluation.
        model_class: ``--model-class``: the transformers class of an ``hf:`` ``arch`` or ``--teacher``;
            without ``arch`` the checkpoint is rebuilt with the class it records, which this may only repeat.

    Raises:
        InputError, DataError, CheckpointError, SourceError: bad options, data, or files (exit 2); a
            ``model_class`` that contradicts the checkpoint's recorded class without ``arch``.
        BackendUnavailableError: a missing device or optional package (exit 3).
    """
    started = time.perf_counter()
    cfg = config
    cfg.validate()
    check_data_spec(cfg.data)
    if cfg.eval_data:
        check_data_spec(cfg.eval_data, "--eval-data")
    ckpt_path = Path(checkpoint)
    out = Path(output) if output else _default_output(ckpt_path)
    if out.resolve() == ckpt_path.resolve() and not resume:
        raise InputError(f"output {out} is also the input: choose another -o")
    resume_from = _resume_source(out, ckpt_path, force) if resume else None
    if is_directory_output(ckpt_path, out):  # a sharded input gives a sharded output in its layout
        check_output_directory(out, force=force or resume_from is not None, inputs=[] if resume_from else [ckpt_path])
    else:
        check_output_path(out, force=force or resume_from is not None, inputs=[] if resume_from else [ckpt_path])
    _require_checkpoint(os.fspath(checkpoint))
    start, stored = open_start(ckpt_path, shard=cfg.shard)  # fsdp under torchrun: metadata and masks only
    if not start.meta.layers:
        raise InputError(f"{ckpt_path} has no pruned layers: prune it first (nmcli prune)")
    if not arch:
        check_recorded_class(str(ckpt_path), start.meta.source, model_class)
    dist = init_distributed("cuda" if cfg.device.startswith("cuda") else "cpu")
    try:
        session = setup_session(start, ckpt_path, out, resume_from, cfg, dist, arch, trust, stored, model_class)
        if "before" not in session.evals:
            before = evaluate_session(session)
            if before is not None:
                session.evals["before"] = before
        stopped_by = train_loop(session, on_step, on_eval)
        interrupted = stopped_by is not None
        save_progress(session, final=not interrupted)
        if dist.world > 1 and not interrupted:
            import torch.distributed as tdist

            tdist.barrier()
        return replace(_result(session, interrupted, time.perf_counter() - started), stopped_by=stopped_by)
    finally:
        if dist.owns_group:
            import torch.distributed as tdist

            with contextlib.suppress(Exception):
                tdist.destroy_process_group()


def _result(session: Session, interrupted: bool, seconds: float) -> FinetuneResult:
    notes = list(session.data.notes)
    bn = {"mode": session.cfg.bn, "recalibrated_batches": session.bn_used}
    if has_batchnorm(session.model) and session.bn_used:
        notes.append(
            f"BatchNorm running statistics re-estimated on {session.bn_used} training batches with the final masks"
        )
    elif has_batchnorm(session.model):
        notes.append("BatchNorm running statistics were not re-estimated (--bn-batches 0)")
    return FinetuneResult(
        output=session.out if session.dist.main else None,
        steps=session.step,
        total_steps=session.data.total,
        final_loss=session.losses[-1] if session.losses else None,
        sad_vs_start=compare_masks(session.start.start_masks, session.sparse.final_masks()),
        seconds=seconds,
        interrupted=interrupted,
        losses=session.losses,
        evals=session.evals,
        notes=notes,
        bn=bn,
    )


_NOT_CHECKPOINTS = {
    Form.STATE_DICT: "a plain state dict",
    Form.TORCH_FILE: "a torch file (state dict, TorchScript or pickled module)",
    Form.EXPORTED: "a torch.export program",
    Form.ONNX: "an ONNX file",
    Form.ENGINE: "a TensorRT engine",
}


def _require_checkpoint(checkpoint: str) -> None:
    """Finetune starts from an nmcli checkpoint (masks to keep): anything else is told to prune first.

    Raises:
        InputError: a model file that is not an nmcli checkpoint.
    """
    kind = classify(checkpoint)
    what = _NOT_CHECKPOINTS.get(kind.form) or ("a model source" if kind.prefix else None)
    if what is None:
        return  # a checkpoint, or missing/unreadable: load_checkpoint says which
    arch = " --arch SPEC" if kind.form in (Form.STATE_DICT, Form.TORCH_FILE) else ""
    raise InputError(
        f"{checkpoint} is {what}, not an nmcli checkpoint: prune it first (nmcli prune {checkpoint} "
        f"--pattern 2:4{arch}), then finetune the .safetensors it writes"
    )

"""Pruning: turn a dense model into an nmcli/1 checkpoint with N:M masks.

``magnitude`` keeps the N largest-magnitude weights of every group and needs no data;
``wanda`` and ``sparsegpt`` (DESIGN.md section 3b) use calibration data and run block by block
(:mod:`nmcli.oneshot`, which holds the one registry of methods). A model with BatchNorm pruned
with calibration data gets its running statistics re-estimated on it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmcli.batchnorm import has_batchnorm
from nmcli.checkpoint import Checkpoint, CheckpointMeta, LayerEntry, SourceRef, history_record, save_checkpoint
from nmcli.data import Batch, check_data_spec
from nmcli.errors import InputError
from nmcli.inputs import InputSpec, parse_input_spec
from nmcli.io import check_output_path
from nmcli.oneshot import (
    CALIBRATED,
    SOLVERS,
    CalibrationConfig,
    calibration_batches,
    prune_calibrated,
)
from nmcli.patterns import (
    LayerCandidate,
    Pattern,
    apply_mask,
    count_kept,
    find_layers,
    l1_norm,
    nm_mask,
    parse_pattern,
)
from nmcli.sources import default_output_path, load_model

ProgressCallback = Callable[[int, int, str], None]


def magnitude_mask(weight: torch.Tensor, pattern: Pattern, axis: int) -> torch.Tensor:
    """Keep the N largest |w| of every group of M along ``axis`` (ties: lower index)."""
    return nm_mask(weight, pattern, axis)


# The pruning methods (their solvers live in :data:`nmcli.oneshot.SOLVERS`): ``magnitude`` needs no
# data; the calibrated ones need ``--calib``.
METHODS: tuple[str, ...] = tuple(SOLVERS)


@dataclass(frozen=True)
class LayerReport:
    """What happened to one candidate layer.

    ``kept_magnitude`` is the share of the layer's L1 magnitude that the effective weight keeps;
    ``recon_error`` is ``||W X - W~ X||^2 / ||W X||^2`` on the calibration inputs (None without them).
    """

    name: str
    param: str
    shape: tuple[int, ...]
    status: str  # "pruned" or "skipped"
    reason: str
    kept_magnitude: float | None
    recon_error: float | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "param": self.param,
            "shape": list(self.shape),
            "status": self.status,
            "reason": self.reason,
            "kept_magnitude": self.kept_magnitude,
            "recon_error": self.recon_error,
            "note": self.note,
        }


@dataclass
class PruneResult:
    """The pruned checkpoint and the per-layer report.

    ``params_pruned`` counts the weights the masks set to zero; ``sparsity`` is that over
    ``params_total``, every parameter of the model. ``notes`` say how a calibrated method
    traversed the model and whether BatchNorm statistics were re-estimated.
    """

    checkpoint: Checkpoint
    pattern: Pattern
    method: str
    layers: list[LayerReport]
    params_total: int
    params_pruned: int
    output: Path | None = None
    notes: list[str] = field(default_factory=list)
    bn_recalibrated: bool = False
    calib_samples: int = 0

    @property
    def sparsity(self) -> float:
        return self.params_pruned / self.params_total if self.params_total else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output) if self.output else None,
            "pattern": str(self.pattern),
            "method": self.method,
            "calib_samples": self.calib_samples,
            "bn_recalibrated": self.bn_recalibrated,
            "params_total": self.params_total,
            "params_pruned": self.params_pruned,
            "sparsity": self.sparsity,
            "notes": self.notes,
            "layers": [layer.to_json() for layer in self.layers],
        }


def check_method(name: str, has_calibration: bool) -> None:
    """Raise a clear :class:`InputError` for an unknown method, or a calibrated one without data."""
    if name not in METHODS:
        raise InputError(f"unknown pruning method {name!r}: choose one of {', '.join(METHODS)}")
    if name in CALIBRATED and not has_calibration:
        raise InputError(
            f"--method {name} needs calibration data: pass --calib SPEC (tensors:FILE.safetensors, text:FILE.txt, "
            "imagefolder:DIR or py:module:callable), or use --method magnitude"
        )


def _l1(weight: torch.Tensor) -> float:
    return l1_norm(weight)


def prune_model(
    model: nn.Module,
    pattern: Pattern,
    *,
    source: SourceRef,
    method: str = "magnitude",
    calibration: CalibrationConfig | None = None,
    batches: Sequence[Batch] | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    keep_dense: bool = False,
    input_spec: InputSpec | None = None,
    start: Checkpoint | None = None,
    history_args: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    inplace: bool = False,
) -> PruneResult:
    """Prune every eligible layer of ``model`` to ``pattern``; the model is not modified unless ``inplace``.

    Without calibration batches every layer gets its magnitude mask, and the checkpoint's tensors
    share memory with the model's (only the pruned weights are new tensors, or, with ``inplace``,
    the model's own weights zeroed where pruned). With ``batches`` the model is pruned block by block
    by :func:`nmcli.oneshot.prune_calibrated` (a copy of it, unless ``inplace``), and a model with
    BatchNorm gets its running statistics re-estimated on them (``calibration.bn_recalibrate``).

    Args:
        model: the dense model (eval mode).
        pattern: the N:M pattern.
        source: where the architecture comes from, recorded in the checkpoint.
        method: ``magnitude``, ``wanda`` or ``sparsegpt`` (the last two need ``batches``).
        calibration: damping, block size, device and BatchNorm options of a calibrated prune.
        batches: calibration batches (see :func:`nmcli.oneshot.calibration_batches`).
        include: module-name globs to prune (all eligible layers when empty).
        exclude: module-name globs to leave dense.
        keep_dense: store dense weights of pruned layers for SR-STE fine-tuning: the original
            weights, or after SparseGPT its updated weights where kept and the original ones where pruned.
        input_spec: stored in the checkpoint for later commands.
        start: the checkpoint the model was read from, if any: its dense weights are pruned
            instead of its effective ones, and its history is carried on.
        history_args: the command's arguments for the history record.
        progress: called as ``progress(done, total, param)`` after each layer.
        inplace: write the effective weights into the model's own tensors.
    """
    check_method(method, batches is not None)
    cfg = calibration or CalibrationConfig(spec="")
    candidates = find_layers(model, pattern, include, exclude)
    eligible = [c for c in candidates if c.eligible]
    if batches is not None:
        if not inplace:
            model = copy.deepcopy(model)
        state, outcomes, notes, bn_done = _prune_with_data(
            model, eligible, pattern, method, batches, cfg, start, progress, keep_dense
        )
    else:
        state = {k: v.detach() for k, v in model.state_dict().items()}
        if start is not None:
            state.update(start.dense)
        outcomes, notes, bn_done = {}, [], False
        if has_batchnorm(model):
            notes.append(
                "the model has BatchNorm and its running statistics were not re-estimated after pruning "
                "(one-shot N:M can collapse such a model in eval mode): pass --calib SPEC to re-estimate them"
            )
    params_total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return _assemble(
        state, candidates, outcomes, pattern, params_total=params_total, source=source, method=method,
        keep_dense=keep_dense, inplace=inplace, start=start, input_spec=input_spec, history_args=history_args,
        progress=progress, notes=notes, bn_done=bn_done, samples=sum(b.size for b in batches) if batches else 0,
        calibrated=batches is not None,
    )  # fmt: skip


def prune_state_dict(
    state: dict[str, torch.Tensor],
    candidates: Sequence[LayerCandidate],
    pattern: Pattern,
    *,
    source: SourceRef,
    keep_dense: bool = False,
    notes: Sequence[str] = (),
    history_args: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> PruneResult:
    """Magnitude-prune the ``candidates`` of a bare state dict (layers inferred from the tensors, no model)."""
    params_total = sum(t.numel() for t in state.values() if t.is_floating_point())
    return _assemble(
        dict(state), candidates, {}, pattern, params_total=params_total, source=source, method="magnitude",
        keep_dense=keep_dense, inplace=False, start=None, input_spec=None, history_args=history_args,
        progress=progress, notes=list(notes), bn_done=False, samples=0, calibrated=False,
    )  # fmt: skip


def _assemble(
    state: dict[str, torch.Tensor],
    candidates: Sequence[LayerCandidate],
    outcomes: dict[str, _CalibratedLayer],
    pattern: Pattern,
    *,
    params_total: int,
    source: SourceRef,
    method: str,
    keep_dense: bool,
    inplace: bool,
    start: Checkpoint | None,
    input_spec: InputSpec | None,
    history_args: dict[str, Any] | None,
    progress: ProgressCallback | None,
    notes: list[str],
    bn_done: bool,
    samples: int,
    calibrated: bool,
) -> PruneResult:
    """Masks, effective weights, layer entries and the report, from magnitude or a calibrated method's outcomes."""
    eligible = [c for c in candidates if c.eligible]
    masks: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}
    entries: list[LayerEntry] = []
    reports: list[LayerReport] = []
    pruned_params = 0
    for cand in candidates:
        if not cand.eligible:
            reports.append(LayerReport(cand.module, cand.param, cand.shape, "skipped", cand.reason, None))
            continue
        weight = state[cand.param]
        outcome = outcomes.get(cand.param)
        if outcome is None:  # data-free magnitude
            mask = magnitude_mask(weight, pattern, cand.axis)
            total = _l1(weight)
            if keep_dense:
                dense[cand.param] = weight.clone() if inplace else weight
            if inplace and (start is None or cand.param not in start.dense):
                effective = weight.masked_fill_(~mask, 0)  # fills +0.0, never -0.0
            else:
                effective = apply_mask(weight, mask)
            error, note = None, ""
            if progress is not None:
                progress(len(masks) + 1, len(eligible), cand.param)
        else:
            mask, effective, total = outcome.mask, weight, outcome.l1_before
            if keep_dense and outcome.original is not None:
                dense[cand.param] = torch.where(mask, outcome.weight, outcome.original)
            error, note = outcome.recon_error, outcome.note
        kept = _l1(effective) / total if total > 0 else 1.0
        state[cand.param] = effective
        masks[cand.param] = mask
        pruned_params += int(mask.numel()) - count_kept(mask)
        entries.append(LayerEntry(cand.param, cand.module, pattern.n, pattern.m, cand.axis, cand.shape))
        reports.append(LayerReport(cand.module, cand.param, cand.shape, "pruned", "", kept, error, note))
    metrics: dict[str, Any] = {
        "layers_pruned": len(entries),
        "params_pruned": pruned_params,
        "sparsity": pruned_params / params_total if params_total else 0.0,
    }
    if calibrated:
        errors = [r.recon_error for r in reports if r.recon_error is not None]
        metrics.update(
            {
                "calib_samples": samples,
                "bn_recalibrated": bn_done,
                "mean_recon_error": sum(errors) / len(errors) if errors else None,
            }
        )
    history = list(start.meta.history) if start is not None else []
    history.append(history_record("prune", history_args or {"pattern": str(pattern), "method": method}, metrics))
    meta = CheckpointMeta(
        source=source,
        pattern=pattern,
        layers=entries,
        input_spec=str(input_spec) if input_spec else None,
        history=history,
        method=method,
    )
    ckpt = Checkpoint(tensors=state, masks=masks, meta=meta, dense=dense)
    return PruneResult(ckpt, pattern, method, reports, params_total, pruned_params, None, notes, bn_done, samples)


@dataclass
class _CalibratedLayer:
    mask: torch.Tensor
    original: torch.Tensor | None  # the dense weight before pruning (kept only for --keep-dense)
    weight: torch.Tensor  # the method's weight before masking (SparseGPT: updated)
    l1_before: float
    recon_error: float | None
    note: str


def _prune_with_data(
    model: nn.Module,
    eligible: Sequence[LayerCandidate],
    pattern: Pattern,
    method: str,
    batches: Sequence[Batch],
    cfg: CalibrationConfig,
    start: Checkpoint | None,
    progress: ProgressCallback | None,
    keep_dense: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, _CalibratedLayer], list[str], bool]:
    """Run a calibrated prune on ``model`` (modified in place); returns its state, outcomes, notes and BN flag."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        if start is not None:  # prune the stored dense weights, not the effective ones
            for name, value in start.dense.items():
                if name in params:
                    params[name].copy_(value)
        l1_before = {c.param: _l1(params[c.param].detach()) for c in eligible}
        # the dense weights only for --keep-dense: without it no copy of the model is held
        originals = {c.param: params[c.param].detach().clone() for c in eligible} if keep_dense else {}
    result = prune_calibrated(model, eligible, pattern, method, batches, cfg, progress)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    outcomes = {
        name: _CalibratedLayer(o.mask, originals.get(name), o.weight, l1_before[name], o.recon_error, o.note)
        for name, o in result.outcomes.items()
    }
    return state, outcomes, result.notes, result.bn_recalibrated


def run_prune(
    model_spec: str,
    *,
    pattern: str | Pattern = "2:4",
    method: str = "magnitude",
    calibration: CalibrationConfig | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    arch: str | None = None,
    trust: bool = False,
    input_shape: str | None = None,
    keep_dense: bool = False,
    output: str | Path | None = None,
    force: bool = False,
    infer_layers: bool = False,
    progress: ProgressCallback | None = None,
) -> PruneResult:
    """``nmcli prune``: load ``model_spec``, prune it, and write the checkpoint atomically.

    ``infer_layers`` prunes a bare state dict (``.pt``/``.pth``/``.safetensors``) without ``--arch``:
    its layers are inferred from the tensors (:func:`nmcli.patterns.infer_layers`), magnitude only,
    and the checkpoint records that; commands that must run the model then need ``--arch``.

    Options are validated and the output path checked before the model is loaded, so bad input
    fails fast and no partial file is ever left. ``calibration`` (``--calib`` and its options)
    is required by ``wanda`` and ``sparsegpt``; with ``magnitude`` it only serves the BatchNorm
    re-estimation and the per-layer reconstruction errors.
    """
    nm = parse_pattern(pattern)
    check_method(method, calibration is not None)
    if calibration is not None:
        calibration.validate()
        check_data_spec(calibration.spec, "--calib")
    spec_input = parse_input_spec(input_shape) if input_shape else None
    if _streamed(model_spec, output):
        return _run_prune_directory(
            model_spec,
            nm,
            method=method,
            calibration=calibration,
            include=include,
            exclude=exclude,
            input_spec=spec_input,
            keep_dense=keep_dense,
            output=output,
            force=force,
            progress=progress,
        )
    out = Path(output) if output else default_output_path(model_spec, nm.slug)
    local_input = model_spec[3:] if model_spec.startswith("hf:") else model_spec
    if infer_layers:
        if arch:
            raise InputError("--infer-layers and --arch exclude each other: --arch gives the real layers")
        if method != "magnitude" or calibration is not None:
            raise InputError(f"--infer-layers prunes by magnitude only: {method} with --calib needs the model (--arch)")
    check_output_path(out, force=force, inputs=[local_input])
    if infer_layers:
        return _prune_inferred(model_spec, nm, out, include, exclude, keep_dense, trust, force, progress)
    loaded = load_model(model_spec, arch=arch, trust=trust)
    input_spec = spec_input or loaded.input_spec
    batches = None
    if calibration is not None:
        source = loaded.source.arch or loaded.source.spec
        shape = input_spec.tensors[0].shape if input_spec is not None else None
        batches = calibration_batches(calibration, source_spec=source, input_shape=shape)
    result = prune_model(
        loaded.model,
        nm,
        source=loaded.source,
        method=method,
        calibration=calibration,
        batches=batches,
        include=include,
        exclude=exclude,
        keep_dense=keep_dense,
        input_spec=input_spec,
        start=loaded.checkpoint,
        inplace=True,  # the model was loaded here and is not used again
        history_args={
            "model": model_spec,
            "pattern": str(nm),
            "method": method,
            "include": list(include),
            "exclude": list(exclude),
            "arch": arch,
            "keep_dense": keep_dense,
            **(_calibration_args(calibration) if calibration is not None else {}),
        },
        progress=progress,
    )
    if not result.checkpoint.masks:
        raise InputError(
            f"no layer of {model_spec} can be pruned to {nm}: "
            + ("; ".join(sorted({r.reason for r in result.layers})) or "it has no Linear, Conv or attention layers")
        )
    save_checkpoint(result.checkpoint, out, force=force, inputs=[local_input])
    result.output = out
    return result


def _streamed(model_spec: str, output: str | Path | None) -> bool:
    """Whether ``model_spec`` is pruned from its shards without loading it (:mod:`nmcli.sharded`).

    A local HF directory with sharded safetensors (``hf:DIR`` or a bare ``DIR``) always is; one with a
    single ``model.safetensors`` is when given as a bare ``DIR`` or with an ``-o`` that is not a
    ``.safetensors`` file (``hf:DIR`` alone keeps writing one nmcli/1 file). Its output is a directory.
    """
    from nmcli.sharded import INDEX, is_hf_directory, is_sharded_checkpoint, local_directory

    folder = local_directory(model_spec)
    if folder is None or is_sharded_checkpoint(folder) or not is_hf_directory(folder):
        return False
    if output is not None and str(output).endswith(".safetensors"):
        return False  # loaded whole by transformers, written as one nmcli/1 file
    if (folder / INDEX).is_file() or not model_spec.startswith("hf:"):
        return True
    return output is not None and not str(output).endswith(".safetensors")


def _run_prune_directory(
    model_spec: str,
    nm: Pattern,
    *,
    method: str,
    calibration: CalibrationConfig | None,
    include: Sequence[str],
    exclude: Sequence[str],
    input_spec: InputSpec | None,
    keep_dense: bool,
    output: str | Path | None,
    force: bool,
    progress: ProgressCallback | None,
) -> PruneResult:
    """``run_prune`` of an HF directory: tensor by tensor (magnitude) or block by block, into a sharded checkpoint."""
    from nmcli.sharded import build_skeleton, check_output_directory, local_directory, prune_directory
    from nmcli.sources import guess_input_spec, source_ref

    folder = local_directory(model_spec)
    assert folder is not None
    out = Path(output) if output else default_output_path(model_spec, nm.slug, suffix="")
    if str(out).endswith(".safetensors"):
        raise InputError(
            f"{model_spec} is a sharded model and is written as a directory: give -o a directory name, not {out}"
        )
    check_output_directory(out, force=force, inputs=[folder])
    spec = model_spec if model_spec.startswith("hf:") else f"hf:{model_spec}"
    source = source_ref(spec)
    skeleton = build_skeleton(folder)
    if input_spec is None:
        input_spec = guess_input_spec(skeleton)
    batches = None
    if calibration is not None:
        shape = input_spec.tensors[0].shape if input_spec is not None else None
        batches = calibration_batches(calibration, source_spec=source.spec, input_shape=shape)
    return prune_directory(
        model_spec,
        folder,
        out,
        nm,
        source=source,
        method=method,
        calibration=calibration,
        batches=batches,
        include=include,
        exclude=exclude,
        keep_dense=keep_dense,
        input_spec=str(input_spec) if input_spec else None,
        skeleton=skeleton,
        history_args={
            "model": model_spec,
            "pattern": str(nm),
            "method": method,
            "include": list(include),
            "exclude": list(exclude),
            "keep_dense": keep_dense,
            **(_calibration_args(calibration) if calibration is not None else {}),
        },
        force=force,
        progress=progress,
    )


def _calibration_args(cfg: CalibrationConfig) -> dict[str, Any]:
    return {
        "calib": cfg.spec,
        "calib_samples": cfg.samples,
        "max_length": cfg.max_length,
        "damp": cfg.damp,
        "block_size": cfg.block_size,
        "bn_recalibrate": cfg.bn_recalibrate,
    }


def _prune_inferred(
    spec: str,
    pattern: Pattern,
    out: Path,
    include: Sequence[str],
    exclude: Sequence[str],
    keep_dense: bool,
    trust: bool,
    force: bool,
    progress: ProgressCallback | None,
) -> PruneResult:
    from nmcli.checkpoint import sha256_file
    from nmcli.sources import normalize_spec
    from nmcli.statedicts import infer_state_dict_layers

    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--infer-layers needs a state-dict file (.pt, .pth, .bin, .safetensors); {spec} is not one")
    found = infer_state_dict_layers(path, pattern=pattern, trust=trust, include=list(include), exclude=list(exclude))
    result = prune_state_dict(
        dict(found.state.tensors),
        found.candidates,
        pattern,
        source=SourceRef(spec=normalize_spec(spec), sha256=sha256_file(path)),
        keep_dense=keep_dense,
        notes=found.notes,
        history_args={
            "model": spec,
            "pattern": str(pattern),
            "method": "magnitude",
            "infer_layers": True,
            "include": list(include),
            "exclude": list(exclude),
            "keep_dense": keep_dense,
        },
        progress=progress,
    )
    if not result.checkpoint.masks:
        raise InputError(f"no tensor of {spec} was inferred to be a prunable layer for {pattern}: pass --arch SPEC")
    save_checkpoint(result.checkpoint, out, force=force, inputs=[spec])
    result.output = out
    return result

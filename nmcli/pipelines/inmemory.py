"""Pruning a model held in memory: layer selection, masks, and the checkpoint that records them."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmcli.algorithms.config import CalibrationConfig
from nmcli.algorithms.solve import CALIBRATED, SOLVERS
from nmcli.errors import InputError
from nmcli.formats.checkpoint import Checkpoint, CheckpointMeta, LayerEntry, SourceRef, history_record
from nmcli.inputs import InputSpec
from nmcli.models.batchnorm import has_batchnorm
from nmcli.models.data import Batch
from nmcli.models.layers import LayerCandidate, find_layers
from nmcli.nm.masks import apply_mask, count_kept, l1_norm, magnitude_mask
from nmcli.nm.pattern import Pattern
from nmcli.pipelines.blocks import prune_calibrated
from nmcli.progress import ProgressCallback

# The pruning methods (their solvers live in :data:`nmcli.algorithms.solve.SOLVERS`): ``magnitude`` needs no
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
    calibration_path: str = ""  # blocks, stages or dense (nmcli.pipelines.blocks); empty without calibration

    @property
    def sparsity(self) -> float:
        return self.params_pruned / self.params_total if self.params_total else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output) if self.output else None,
            "pattern": str(self.pattern),
            "method": self.method,
            "calib_samples": self.calib_samples,
            "calibration_path": self.calibration_path or None,
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
    by :func:`nmcli.pipelines.blocks.prune_calibrated` (a copy of it, unless ``inplace``), and a model with
    BatchNorm gets its running statistics re-estimated on them (``calibration.bn_recalibrate``).

    Args:
        model: the dense model (eval mode).
        pattern: the N:M pattern.
        source: where the architecture comes from, recorded in the checkpoint.
        method: ``magnitude``, ``wanda`` or ``sparsegpt`` (the last two need ``batches``).
        calibration: damping, block size, device and BatchNorm options of a calibrated prune.
        batches: calibration batches (see :func:`nmcli.pipelines.blocks.calibration_batches`).
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
        state, outcomes, notes, bn_done, path = _prune_with_data(
            model, eligible, pattern, method, batches, cfg, start, progress, keep_dense
        )
    else:
        state = {k: v.detach() for k, v in model.state_dict().items()}
        if start is not None:
            state.update(start.dense)
        outcomes, notes, bn_done, path = {}, [], False, ""
        if has_batchnorm(model):
            notes.append(
                "the model has BatchNorm and its running statistics were not re-estimated after pruning "
                "(one-shot N:M can collapse such a model in eval mode): pass --calib SPEC to re-estimate them"
            )
    params_total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    result = _assemble(
        state, candidates, outcomes, pattern, params_total=params_total, source=source, method=method,
        keep_dense=keep_dense, inplace=inplace, start=start, input_spec=input_spec, history_args=history_args,
        progress=progress, notes=notes, bn_done=bn_done, samples=sum(b.size for b in batches) if batches else 0,
        calibrated=batches is not None,
    )  # fmt: skip
    result.calibration_path = path
    return result


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
) -> tuple[dict[str, torch.Tensor], dict[str, _CalibratedLayer], list[str], bool, str]:
    """Run a calibrated prune on ``model`` (modified in place): its state, outcomes, notes, BN flag and path."""
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
    return state, outcomes, result.notes, result.bn_recalibrated, result.path

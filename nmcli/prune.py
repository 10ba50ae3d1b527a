"""Pruning: turn a dense model into an nmcli/1 checkpoint with N:M masks.

Methods are pluggable: a method maps ``(weight, pattern, axis)`` to a boolean mask. ``magnitude``
keeps the N largest-magnitude weights of every group (the one-shot start of SR-STE training).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmcli.checkpoint import Checkpoint, CheckpointMeta, LayerEntry, SourceRef, history_record, save_checkpoint
from nmcli.errors import InputError
from nmcli.inputs import InputSpec, parse_input_spec
from nmcli.io import check_output_path
from nmcli.patterns import Pattern, apply_mask, find_layers, nm_mask, parse_pattern
from nmcli.sources import default_output_path, load_model

MaskMethod = Callable[[torch.Tensor, Pattern, int], torch.Tensor]
ProgressCallback = Callable[[int, int, str], None]


def magnitude_mask(weight: torch.Tensor, pattern: Pattern, axis: int) -> torch.Tensor:
    """Keep the N largest |w| of every group of M along ``axis`` (ties: lower index)."""
    return nm_mask(weight, pattern, axis)


METHODS: dict[str, MaskMethod] = {"magnitude": magnitude_mask}


@dataclass(frozen=True)
class LayerReport:
    """What happened to one candidate layer."""

    name: str
    param: str
    shape: tuple[int, ...]
    status: str  # "pruned" or "skipped"
    reason: str
    kept_magnitude: float | None  # share of the layer's L1 magnitude that the mask keeps

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "param": self.param,
            "shape": list(self.shape),
            "status": self.status,
            "reason": self.reason,
            "kept_magnitude": self.kept_magnitude,
        }


@dataclass
class PruneResult:
    """The pruned checkpoint and the per-layer report.

    ``params_pruned`` counts the weights the masks set to zero; ``sparsity`` is that over
    ``params_total``, every parameter of the model.
    """

    checkpoint: Checkpoint
    pattern: Pattern
    method: str
    layers: list[LayerReport]
    params_total: int
    params_pruned: int
    output: Path | None = None

    @property
    def sparsity(self) -> float:
        return self.params_pruned / self.params_total if self.params_total else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output) if self.output else None,
            "pattern": str(self.pattern),
            "method": self.method,
            "params_total": self.params_total,
            "params_pruned": self.params_pruned,
            "sparsity": self.sparsity,
            "layers": [layer.to_json() for layer in self.layers],
        }


def get_method(name: str) -> MaskMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise InputError(f"unknown pruning method {name!r}: choose one of {', '.join(sorted(METHODS))}") from None


def prune_model(
    model: nn.Module,
    pattern: Pattern,
    *,
    source: SourceRef,
    method: str = "magnitude",
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

    The checkpoint's tensors share memory with the model's (no copy of the state dict is made);
    only the pruned weights are new tensors, or, with ``inplace``, the model's own weights zeroed
    where pruned, which saves one copy of every pruned weight when the caller owns the model.

    Args:
        model: the dense model (its state dict is read).
        pattern: the N:M pattern.
        source: where the architecture comes from, recorded in the checkpoint.
        method: a key of :data:`METHODS`.
        include: module-name globs to prune (all eligible layers when empty).
        exclude: module-name globs to leave dense.
        keep_dense: store the original dense weights of pruned layers (for SR-STE fine-tuning).
        input_spec: stored in the checkpoint for later commands.
        start: the checkpoint the model was read from, if any: its dense weights are pruned
            instead of its effective ones, and its history is carried on.
        history_args: the command's arguments for the history record.
        progress: called as ``progress(done, total, param)`` after each layer.
        inplace: write the effective weights into the model's own tensors.
    """
    mask_of = get_method(method)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if start is not None:
        state.update(start.dense)
    candidates = find_layers(model, pattern, include, exclude)
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
        mask = mask_of(weight, pattern, cand.axis)
        # L1 norms accumulate in float32 (fast, and exact enough for a percentage).
        total = float(torch.linalg.vector_norm(weight, 1, dtype=torch.float32))
        if keep_dense:
            dense[cand.param] = weight.clone() if inplace else weight
        if inplace and (start is None or cand.param not in start.dense):
            effective = weight.masked_fill_(~mask, 0)  # fills +0.0, never -0.0
        else:
            effective = apply_mask(weight, mask)
        kept = float(torch.linalg.vector_norm(effective, 1, dtype=torch.float32)) / total if total > 0 else 1.0
        state[cand.param] = effective
        masks[cand.param] = mask
        pruned_params += int(mask.numel() - int(mask.sum()))
        entries.append(LayerEntry(cand.param, cand.module, pattern.n, pattern.m, cand.axis, cand.shape))
        reports.append(LayerReport(cand.module, cand.param, cand.shape, "pruned", "", kept))
        if progress is not None:
            progress(sum(1 for r in reports if r.status == "pruned"), len(eligible), cand.param)
    params_total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    history = list(start.meta.history) if start is not None else []
    history.append(
        history_record(
            "prune",
            history_args or {"pattern": str(pattern), "method": method},
            {
                "layers_pruned": len(entries),
                "params_pruned": pruned_params,
                "sparsity": pruned_params / params_total if params_total else 0.0,
            },
        )
    )
    meta = CheckpointMeta(
        source=source,
        pattern=pattern,
        layers=entries,
        input_spec=str(input_spec) if input_spec else None,
        history=history,
        method=method,
    )
    ckpt = Checkpoint(tensors=state, masks=masks, meta=meta, dense=dense)
    return PruneResult(ckpt, pattern, method, reports, params_total, pruned_params)


def run_prune(
    model_spec: str,
    *,
    pattern: str | Pattern = "2:4",
    method: str = "magnitude",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    arch: str | None = None,
    trust: bool = False,
    input_shape: str | None = None,
    keep_dense: bool = False,
    output: str | Path | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> PruneResult:
    """``nmcli prune``: load ``model_spec``, prune it, and write the checkpoint atomically.

    Options are validated and the output path checked before the model is loaded, so bad input
    fails fast and no partial file is ever left.
    """
    nm = parse_pattern(pattern)
    get_method(method)
    spec_input = parse_input_spec(input_shape) if input_shape else None
    out = Path(output) if output else default_output_path(model_spec, nm.slug)
    local_input = model_spec[3:] if model_spec.startswith("hf:") else model_spec
    check_output_path(out, force=force, inputs=[local_input])
    loaded = load_model(model_spec, arch=arch, trust=trust)
    result = prune_model(
        loaded.model,
        nm,
        source=loaded.source,
        method=method,
        include=include,
        exclude=exclude,
        keep_dense=keep_dense,
        input_spec=spec_input or loaded.input_spec,
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

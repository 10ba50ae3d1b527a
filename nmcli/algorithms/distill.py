"""Fine-tuning losses: the task loss and the distillation loss against a dense teacher."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nmcli.errors import (
    DataError,
)
from nmcli.models.data import Batch, TrainData
from nmcli.models.evaluation import is_hidden_state, primary_output


def _primary(out: Any) -> torch.Tensor:
    """The main output tensor: logits, else the last hidden state, else the first tensor."""
    value = primary_output(out)
    if value is None:
        raise DataError(f"cannot find an output tensor in the model's {type(out).__name__} output")
    return value


def _has_logits(out: Any, targets: torch.Tensor | None) -> bool:
    """Whether the output is class scores (KL distillation) rather than features/regression (MSE)."""
    return not is_hidden_state(out, targets)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` ``[B, T, ...]`` over the positions where ``mask`` ``[B, T]`` is set."""
    if mask is None or values.dim() < 2 or tuple(mask.shape) != tuple(values.shape[:2]):
        return values.mean()
    weights = mask.to(values.dtype)
    while weights.dim() < values.dim():
        weights = weights.unsqueeze(-1)
    per_position = values.numel() // max(1, mask.numel())
    return (values * weights).sum() / (weights.sum() * per_position).clamp_min(1.0)


def task_loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer targets (class scores on the last axis), MSE for float targets."""
    output = output.float()
    if targets.is_floating_point():
        if tuple(output.shape) != tuple(targets.shape):
            raise DataError(
                f"float targets have shape {tuple(targets.shape)} but the model outputs {tuple(output.shape)}: "
                "regression targets must match the output"
            )
        return F.mse_loss(output, targets.to(output.dtype))
    if tuple(output.shape[:-1]) != tuple(targets.shape):
        raise DataError(
            f"integer targets have shape {tuple(targets.shape)} but the model outputs {tuple(output.shape)}: "
            "class targets need one index per output row"
        )
    valid = targets[targets != -100]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= output.shape[-1]):
        raise DataError(
            f"integer targets range over [{int(valid.min())}, {int(valid.max())}] but the model has "
            f"{output.shape[-1]} outputs: targets must be class indices"
        )
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1).long(), ignore_index=-100)


def distill_loss(
    student: Any, teacher: Any, targets: torch.Tensor | None, temperature: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """Distillation: KL with temperature on logits (times ``T**2``), MSE on hidden states/regression outputs."""
    s, t = _primary(student).float(), _primary(teacher).float()
    if s.shape != t.shape:
        raise DataError(
            f"the teacher outputs {tuple(t.shape)} but the student {tuple(s.shape)}: use a matching --teacher"
        )
    if _has_logits(student, targets):
        log_s = F.log_softmax(s / temperature, dim=-1)
        log_t = F.log_softmax(t / temperature, dim=-1)
        kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
        return _masked_mean(kl, mask) * temperature**2
    return _masked_mean((s - t).pow(2), mask)


def compute_loss(
    model: nn.Module, teacher: nn.Module | None, batch: Batch, data: TrainData, temperature: float
) -> torch.Tensor:
    """Task loss (when the batch has targets or the model returns a loss) plus distillation (with a teacher)."""
    out = model(*batch.args, **batch.kwargs)
    loss: torch.Tensor | None = None
    if data.loss is not None:
        loss = data.loss(out, batch.targets)
    elif getattr(out, "loss", None) is not None:
        loss = out.loss
    elif batch.targets is not None:
        loss = task_loss(_primary(out), batch.targets)
    if teacher is not None:
        kwargs = {k: v for k, v in batch.kwargs.items() if k != "labels"}
        with torch.no_grad():
            t_out = teacher(*batch.args, **kwargs)
        mask = batch.kwargs.get("attention_mask")
        d = distill_loss(out, t_out, batch.targets, temperature, mask)
        loss = d if loss is None else loss + d
    if loss is None:
        raise DataError(
            f"--data {data.spec} has no targets and there is no teacher, so there is nothing to train toward: "
            "use --teacher auto (distill from the dense model) or give targets"
        )
    return loss

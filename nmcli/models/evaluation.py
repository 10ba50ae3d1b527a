"""Held-out evaluation of a sparse model in eval mode, as ``export`` and every user runs it.

Against the teacher (the dense model): top-1 agreement and KL(teacher || student) on logits;
cosine of the mean-pooled embeddings and MSE of the hidden states for base models (no logits).
Against the targets, when the data has them: accuracy and cross-entropy for class targets, MSE for
float targets; a causal LM's own loss on ``labels``. Token-level outputs are averaged over the
positions the attention mask keeps. Runs in float32 without autocast, so the numbers are what a
plain PyTorch load of the saved checkpoint gives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nmcli.models.batchnorm import model_call_kwargs
from nmcli.models.data import Batch


def primary_output(out: Any) -> torch.Tensor | None:
    """The main output tensor: logits, else the last hidden state, else the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is None and isinstance(out, Mapping):
            value = out.get(name)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def is_hidden_state(out: Any, targets: torch.Tensor | None) -> bool:
    """Whether the output is features (a base model's hidden states, or a regression) rather than class scores."""
    if getattr(out, "logits", None) is not None:
        return False
    if getattr(out, "last_hidden_state", None) is not None:
        return True
    return targets is not None and targets.is_floating_point()


class _Sums:
    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, total: float, count: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + total
        self.counts[name] = self.counts.get(name, 0.0) + count

    def means(self) -> dict[str, float]:
        return {k: self.totals[k] / self.counts[k] for k in sorted(self.totals) if self.counts[k] > 0}


def _positions(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``values`` ``[B, T, ...]`` at the positions the attention mask keeps, flattened to ``[n, ...]``."""
    if mask is not None and values.dim() >= 2 and tuple(mask.shape) == tuple(values.shape[:2]):
        return values[mask.to(torch.bool)]
    return values.reshape(-1, values.shape[-1]) if values.dim() >= 2 else values.reshape(-1, 1)


def _pooled(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if hidden.dim() < 3:
        return hidden.reshape(hidden.shape[0], -1)
    if mask is None or tuple(mask.shape) != tuple(hidden.shape[:2]):
        return hidden.mean(1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _vs_teacher(sums: _Sums, s_out: Any, t_out: Any, batch: Batch) -> None:
    s, t = primary_output(s_out), primary_output(t_out)
    if s is None or t is None or s.shape != t.shape:
        return
    s, t = s.float(), t.float()
    mask = batch.kwargs.get("attention_mask")
    if is_hidden_state(s_out, batch.targets):
        pooled_cos = F.cosine_similarity(_pooled(s, mask), _pooled(t, mask), dim=-1)
        sums.add("teacher_cosine", float(pooled_cos.sum()), pooled_cos.numel())
        diff = _positions((s - t).pow(2), mask)
        sums.add("teacher_mse", float(diff.sum()), diff.numel())
        return
    s_pos, t_pos = _positions(s, mask), _positions(t, mask)
    sums.add("teacher_top1", float((s_pos.argmax(-1) == t_pos.argmax(-1)).sum()), s_pos.shape[0])
    kl = F.kl_div(F.log_softmax(s_pos, -1), F.log_softmax(t_pos, -1), log_target=True, reduction="none").sum(-1)
    sums.add("teacher_kl", float(kl.sum()), kl.numel())


def _vs_targets(sums: _Sums, out: Any, targets: torch.Tensor) -> None:
    pred = primary_output(out)
    if pred is None:
        return
    pred = pred.float()
    if targets.is_floating_point():
        if pred.shape == targets.shape:
            sums.add("mse", float((pred - targets.float()).pow(2).sum()), pred.numel())
        return
    if tuple(pred.shape[:-1]) != tuple(targets.shape):
        return
    flat, labels = pred.reshape(-1, pred.shape[-1]), targets.reshape(-1).long()
    keep = labels != -100
    flat, labels = flat[keep], labels[keep]
    sums.add("accuracy", float((flat.argmax(-1) == labels).sum()), labels.numel())
    sums.add("loss", float(F.cross_entropy(flat, labels, reduction="sum")), labels.numel())


@torch.no_grad()
def evaluate(
    model: nn.Module, teacher: nn.Module | None, batches: Sequence[Batch], device: torch.device | str
) -> dict[str, float]:
    """Metrics of ``model`` in eval mode on ``batches`` (see the module docstring); the caller restores its mode.

    Returns a flat dict such as ``{"accuracy": 0.97, "loss": 0.1, "teacher_top1": 0.99, "teacher_kl": 0.01,
    "examples": 90}``.
    """
    model.eval()
    sums = _Sums()
    examples = 0
    extra = model_call_kwargs(model)
    for batch in batches:
        batch = batch.to(device)
        out = model(*batch.args, **batch.kwargs, **extra)
        examples += batch.size
        if teacher is not None:
            kwargs = {k: v for k, v in batch.kwargs.items() if k != "labels"}
            _vs_teacher(sums, out, teacher(*batch.args, **kwargs, **model_call_kwargs(teacher)), batch)
        if batch.targets is not None:
            _vs_targets(sums, out, batch.targets)
        lm_loss = getattr(out, "loss", None)
        if isinstance(lm_loss, torch.Tensor) and "labels" in batch.kwargs:
            sums.add("lm_loss", float(lm_loss) * batch.size, batch.size)
    return {**sums.means(), "examples": float(examples)}

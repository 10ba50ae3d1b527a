"""BatchNorm running statistics: re-estimated after pruning and at the end of fine-tuning.

Training a sparse model (or pruning a dense one) changes the activations every BatchNorm layer
normalizes, while its running statistics are still the dense model's: the model then works in
train mode and fails in eval mode (as ``export`` and every user runs it). Re-estimating the
statistics on a few batches with the final weights fixes that. DESIGN.md sections 3b and 4.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from nmcli.models.data import Batch


def model_call_kwargs(model: nn.Module) -> dict[str, Any]:
    """``use_cache=False`` for models that take it: a KV cache must not carry over between calls."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model has BatchNorm layers that track running statistics."""
    return any(_is_tracking_bn(m) for m in model.modules())


def _is_tracking_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and bool(module.track_running_stats)


@contextmanager
def _bn_only_training(model: nn.Module) -> Iterator[list[nn.modules.batchnorm._BatchNorm]]:
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and _is_tracking_bn(m)]
    modes = {id(m): m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    try:
        model.eval()
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over all batches
            bn.train()
        yield norms
    finally:
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
        for m in model.modules():
            m.train(modes[id(m)])


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Batch]) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (cumulative average, no gradients).

    Only the BatchNorm layers run in train mode; dropout and everything else stay in eval mode.
    Returns the number of batches used.
    """
    used = 0
    extra = model_call_kwargs(model)
    with _bn_only_training(model), torch.no_grad():
        for batch in batches:
            model(*batch.args, **batch.kwargs, **extra)
            used += 1
    return used


def batchnorm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every BatchNorm buffer (running mean/var, batch count), by state-dict name."""
    names = {name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    return {k: v.detach().clone() for k, v in model.named_buffers() if k.rpartition(".")[0] in names}


@torch.no_grad()
def restore_buffers(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy ``saved`` (from :func:`batchnorm_buffers`) back into the model's buffers."""
    own = dict(model.named_buffers())
    for name, value in saved.items():
        own[name].copy_(value.to(own[name].device))

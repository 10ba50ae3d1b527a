"""Whether a model's repeated blocks can be chained: observed once, with hooks, on one calibration batch.

Blocks chain when the model calls them once each, in order, and feeds block ``i + 1`` exactly what
block ``i`` returned (its hidden states), with every other argument the same as block 0's. Then the
block runner can produce each block's inputs from the previous block's outputs alone, whatever the
blocks' shapes (an EfficientNet's MBConv blocks change channel counts from one to the next). Models
that compute something between blocks, skip across blocks or call them out of order do not chain:
their blocks are pruned as stages whose inputs are captured on the partly pruned model.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Where a block takes its hidden states: ("arg", index) or ("kwarg", name).
Slot = tuple[str, Any]


@dataclass
class BlockCall:
    """One call of a block: its arguments and what it returned."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = None


def primary_output(out: Any) -> torch.Tensor | None:
    """A block's hidden states: the tensor it returns, the first of a tuple, or ``last_hidden_state``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    value = getattr(out, "last_hidden_state", None)
    return value if isinstance(value, torch.Tensor) else None


def get_slot(args: Sequence[Any], kwargs: dict[str, Any], slot: Slot) -> Any:
    """The value at ``slot`` of a call (None when the call has no such argument)."""
    kind, key = slot
    if kind == "arg":
        return args[key] if key < len(args) else None
    return kwargs.get(key)


def set_slot(
    args: tuple[Any, ...], kwargs: dict[str, Any], slot: Slot, value: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's arguments with ``value`` at ``slot``."""
    kind, key = slot
    if kind == "arg":
        return (*args[:key], value, *args[key + 1 :]), kwargs
    return args, {**kwargs, key: value}


def _same(a: Any, b: Any) -> bool:
    """Identical objects, or equal tensors / containers / plain values."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # no plain truth value: only identity counts
        return False


def _slots(call: BlockCall) -> list[Slot]:
    return [("arg", i) for i in range(len(call.args))] + [("kwarg", k) for k in call.kwargs]


def _is_hidden(value: Any, hidden: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and (value is hidden or _same(value, hidden))


def observe_calls(model: nn.Module, block_names: Sequence[str], run: Any) -> tuple[list[str], dict[str, BlockCall]]:
    """Run ``run()`` with hooks on the blocks: the order of their calls and each block's first call."""
    modules = dict(model.named_modules())
    order: list[str] = []
    calls: dict[str, BlockCall] = {}
    handles = []
    for name in block_names:

        def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
            order.append(name)
            calls.setdefault(name, BlockCall(args, dict(kwargs)))

        def post(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, name: str = name) -> None:
            if calls[name].output is None:
                calls[name].output = out

        handles.append(modules[name].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(modules[name].register_forward_hook(post, with_kwargs=True))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return order, calls


def chain_slot(order: Sequence[str], calls: dict[str, BlockCall], block_names: Sequence[str]) -> Slot | None:
    """Where every block takes the previous block's hidden states, or None when the blocks do not chain.

    They chain when they ran once each in order, block ``i + 1`` took block ``i``'s primary output at
    one argument (the same one for every block), and every other argument was block 0's.
    """
    if list(order) != list(block_names):
        return None
    first = calls[block_names[0]]
    slot: Slot | None = None
    for prev, name in itertools.pairwise(block_names):
        hidden = primary_output(calls[prev].output)
        call = calls[name]
        if hidden is None:
            return None
        if slot is None:
            slot = next((s for s in _slots(call) if _is_hidden(get_slot(call.args, call.kwargs, s), hidden)), None)
            if slot is None or not isinstance(get_slot(first.args, first.kwargs, slot), torch.Tensor):
                return None
        if not _is_hidden(get_slot(call.args, call.kwargs, slot), hidden):
            return None
        if set(_slots(call)) != set(_slots(first)):
            return None
        for other in _slots(call):
            if other != slot and not _same(
                get_slot(call.args, call.kwargs, other), get_slot(first.args, first.kwargs, other)
            ):
                return None
    return slot

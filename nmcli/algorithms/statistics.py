"""Calibration statistics per layer: input matrices and their Gram matrices (X^T X), accumulated in slices."""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nmcli.algorithms.config import CALIBRATED_KINDS
from nmcli.models.layers import CONV, HF_CONV1D, LINEAR, MHA, LayerCandidate


def to_matrix(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """``weight`` as ``[rows, cols]`` with the reduction axis last and every group of M columns one N:M group."""
    if kind == HF_CONV1D:
        return weight.t()
    if kind == CONV:
        return weight.movedim(1, -1).reshape(weight.shape[0], -1)
    return weight


def from_matrix(matrix: torch.Tensor, kind: str, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`to_matrix`."""
    if kind == HF_CONV1D:
        return matrix.t().contiguous()
    if kind == CONV:
        moved = (shape[0], *shape[2:], shape[1])
        return matrix.reshape(moved).movedim(-1, 1).contiguous()
    return matrix.contiguous()


def conv_columns(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """The unfolded inputs of a ConvNd as ``[patches, k... x C]``, matching :func:`to_matrix`'s column order."""
    dims = x.dim() - 2
    if x.dim() == dims + 1:  # unbatched input
        x = x.unsqueeze(0)
    pad = module._reversed_padding_repeated_twice
    mode = "constant" if module.padding_mode == "zeros" else str(module.padding_mode)
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    for i in range(dims):
        span = (kernel[i] - 1) * dilation[i] + 1
        x = x.unfold(2 + i, span, stride[i])
        if dilation[i] > 1:
            x = x[..., :: dilation[i]]
    # [B, C, L1..Ln, K1..Kn] -> [B, L..., K..., C]
    channels = x.shape[1]
    order = [0, *range(2, 2 + dims), *range(2 + dims, 2 + 2 * dims), 1]
    return x.permute(order).reshape(-1, int(math.prod(kernel)) * channels)


_GRAM_SLICE_BYTES = 32 << 20  # activations converted at a time when computing X^T X


def gram_partial(columns: torch.Tensor) -> torch.Tensor:
    """``X^T X`` of one call's inputs ``columns`` ``[..., cols]``, in float32 (float64 for float64 inputs).

    A calibration batch's Gram matrix is summed over at most a few thousand tokens, where float32 is
    exact enough for a Hessian damped by 1% of its mean diagonal and twice as fast as float64; the
    batches' matrices are then summed in float64 (:meth:`Segment.add_partial`). Half-precision
    activations are converted a slice of ``_GRAM_SLICE_BYTES`` at a time, so no float32 copy of a
    whole batch is made.
    """
    flat = columns.detach().reshape(-1, columns.shape[-1])
    width = flat.shape[1]
    dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    out = torch.zeros(width, width, dtype=dtype, device=flat.device)
    step = max(1, _GRAM_SLICE_BYTES // (out.element_size() * max(width, 1)))
    for start in range(0, flat.shape[0], step):
        cols = flat[start : start + step].to(dtype)
        out.addmm_(cols.t(), cols)
    return out


class Segment:
    """``X^T X`` (float64) of the inputs feeding rows ``rows`` of one weight matrix, or of several that share them.

    The sum runs over calls in the order they are added, each call's matrix computed alone
    (:func:`gram_partial`): the same calls in the same order give the same bits, whichever thread
    computed each one. ``users`` weights read it (q, k and v share their input's matrix).
    """

    def __init__(self, rows: slice, users: int = 1) -> None:
        self.rows = rows
        self.users = users
        self.gram: torch.Tensor | None = None
        self.count = 0

    def add(self, columns: torch.Tensor) -> None:
        """Add ``X^T X`` of one call's inputs ``columns`` ``[..., cols]``."""
        flat_rows = columns.numel() // max(columns.shape[-1], 1) if columns.dim() else 0
        if flat_rows:
            self.add_partial(gram_partial(columns), flat_rows)

    def add_partial(self, partial: torch.Tensor, count: int) -> None:
        """Add one call's Gram matrix ``partial`` of ``count`` input rows."""
        if count == 0:
            return
        if self.gram is None:
            self.gram = partial.to(torch.float64, copy=True)
        else:
            self.gram.add_(partial)
        self.count += count

    def take(self, device: torch.device | str) -> torch.Tensor:
        """The averaged Gram matrix ``X^T X / count`` on ``device``; its last user takes it over."""
        assert self.gram is not None
        self.users -= 1
        if self.users > 0:
            return self.gram.to(device, copy=True).div_(max(self.count, 1))
        gram, self.gram = self.gram, None
        return gram.to(device).div_(max(self.count, 1))


# A pending addition: (segment, one call's Gram matrix, its input rows), applied in call order.
Addition = tuple[Segment, torch.Tensor, int]


class Collector:
    """Forward pre-hooks that accumulate the input statistics of a set of layers.

    Each batch of a pass (several may run at once on :class:`nmcli.algorithms.parallel.Workers`) is
    bracketed by :meth:`begin` and :meth:`end` in the thread that runs it: the hooks only compute that
    batch's Gram matrices, and :meth:`commit` adds them, batch after batch in order, so the sums do not
    depend on which batch finished first. Layers reading the very same input tensor in a call (q, k
    and v) share one computation.

    With ``shared`` (every layer is a Linear reading the same input, as :func:`_sequential_groups`
    groups them), only the first layer is hooked and all of them read one :class:`Segment`: the pass
    may stop at that layer's call.
    """

    def __init__(self, model: nn.Module, layers: Sequence[LayerCandidate], *, shared: bool = False) -> None:
        self._local = threading.local()
        self.segments: dict[str, list[Segment]] = {}
        self._handles: list[Any] = []
        modules = dict(model.named_modules())
        if shared:
            segment = Segment(slice(None), users=len(layers))
            for cand in layers:
                self.segments[cand.param] = [segment]
            module = modules[layers[0].module]
            self._handles.append(module.register_forward_pre_hook(self._linear_hook(layers[0], segment)))
            return
        by_module: dict[str, list[LayerCandidate]] = {}
        for cand in layers:
            by_module.setdefault(cand.module, []).append(cand)
        for module_name, cands in by_module.items():
            module = modules[module_name]
            if cands[0].kind not in CALIBRATED_KINDS:
                continue
            if cands[0].kind == MHA:
                self._hook_attention(module, cands)
            else:
                cand = cands[0]
                segment = Segment(slice(None))
                self.segments[cand.param] = [segment]
                self._handles.append(module.register_forward_pre_hook(self._linear_hook(cand, segment)))

    @staticmethod
    def can_share(layers: Sequence[LayerCandidate]) -> bool:
        """Whether ``layers`` (known to read one input tensor) may share one :class:`Segment` (``shared``)."""
        return (
            bool(layers)
            and all(cand.kind in (LINEAR, HF_CONV1D) for cand in layers)
            and len({cand.module for cand in layers}) == len(layers)
        )

    def begin(self, token_mask: torch.Tensor | None) -> None:
        """Start one batch in this thread: its statistics wait for :meth:`end`."""
        self._local.token_mask = token_mask
        self._local.pending = []
        self._local.last = None

    def end(self) -> list[Addition]:
        """The batch's additions, in call order (for :meth:`commit`)."""
        pending: list[Addition] = self._local.pending
        self._local.pending = None
        self._local.last = None
        return pending

    @staticmethod
    def commit(additions: Sequence[Addition]) -> None:
        """Apply one batch's additions (batches in order)."""
        for segment, partial, count in additions:
            segment.add_partial(partial, count)

    def _add(self, segment: Segment, x: torch.Tensor, tag: object, columns: Callable[[], torch.Tensor]) -> None:
        last = getattr(self._local, "last", None)
        if last is not None and last[0] is x and last[1] == tag:
            partial, count = last[2], last[3]
        else:
            flat = columns()
            flat = flat.reshape(-1, flat.shape[-1])
            if flat.shape[0] == 0:
                return
            partial, count = gram_partial(flat), int(flat.shape[0])
            self._local.last = (x, tag, partial, count)  # x held: a freed address reused would match
        self._local.pending.append((segment, partial, count))

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Drop padded positions (attention mask 0 in this thread's batch) from token inputs ``[B, T, ...]``."""
        mask = self._local.token_mask
        if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x[mask.to(torch.bool)]
        return x

    def _linear_hook(self, cand: LayerCandidate, segment: Segment) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            if cand.kind == CONV and isinstance(module, nn.modules.conv._ConvNd):
                conv = module
                self._add(segment, x, conv, lambda: conv_columns(conv, x))
            else:
                self._add(segment, x, "tokens", lambda: self._tokens(x))

        return hook

    def _hook_attention(self, module: nn.Module, cands: list[LayerCandidate]) -> None:
        embed = int(getattr(module, "embed_dim", 0))
        sources: dict[str, list[tuple[slice, int]]] = {
            "in_proj_weight": [(slice(0, embed), 0), (slice(embed, 2 * embed), 1), (slice(2 * embed, 3 * embed), 2)],
            "q_proj_weight": [(slice(None), 0)],
            "k_proj_weight": [(slice(None), 1)],
            "v_proj_weight": [(slice(None), 2)],
        }
        routes: list[tuple[Segment, int]] = []
        for cand in cands:
            attr = cand.param.rsplit(".", 1)[-1]
            parts = sources.get(attr, [])
            self.segments[cand.param] = [Segment(rows) for rows, _ in parts]
            routes.extend(
                (segment, which) for segment, (_, which) in zip(self.segments[cand.param], parts, strict=True)
            )
        batch_first = bool(getattr(module, "batch_first", False))

        def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            names = ("query", "key", "value")
            inputs = [args[i] if i < len(args) else kwargs.get(names[i]) for i in range(3)]
            mask = kwargs.get("key_padding_mask")
            for segment, which in routes:
                x = inputs[which]
                if not isinstance(x, torch.Tensor):
                    continue
                keep: torch.Tensor | None = None
                if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and x.dim() == 3 and which > 0:
                    keep = ~(mask if batch_first else mask.t())
                    if tuple(keep.shape) != tuple(x.shape[:2]):
                        keep = None
                self._add(segment, x, ("attention", keep is not None), functools.partial(_kept_rows, x, keep))

        self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _kept_rows(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return x if keep is None else x[keep]

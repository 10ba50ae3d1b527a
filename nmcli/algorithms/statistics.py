"""Calibration statistics per layer: input matrices and their Gram matrices (X^T X), accumulated in slices."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nmcli.algorithms.config import CALIBRATED_KINDS
from nmcli.models.layers import CONV, HF_CONV1D, MHA, LayerCandidate


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


_GRAM_SLICE_BYTES = 32 << 20  # float64 activations converted at a time when accumulating X^T X


class Segment:
    """``X^T X`` (float64) of the inputs feeding rows ``rows`` of one weight matrix."""

    def __init__(self, rows: slice) -> None:
        self.rows = rows
        self.gram: torch.Tensor | None = None
        self.count = 0

    def add(self, columns: torch.Tensor) -> None:
        """Add ``X^T X`` of ``columns`` ``[..., cols]``, a slice of rows at a time.

        The float64 copy of a whole batch's activations would be large (8192 tokens x 5632 inputs
        of a 1B model's down projection: 369 MB, plus a product the size of the Gram matrix), so
        slices of ``_GRAM_SLICE_BYTES`` are converted and multiplied into the Gram matrix in place.
        """
        flat = columns.detach().reshape(-1, columns.shape[-1])
        if flat.shape[0] == 0:
            return
        width = flat.shape[1]
        if self.gram is None:
            self.gram = torch.zeros(width, width, dtype=torch.float64, device=flat.device)
        step = max(1, _GRAM_SLICE_BYTES // (8 * max(width, 1)))
        for start in range(0, flat.shape[0], step):
            cols = flat[start : start + step].to(torch.float64)
            self.gram.addmm_(cols.t(), cols)
        self.count += flat.shape[0]

    def take(self, device: torch.device | str) -> torch.Tensor:
        """The averaged Gram matrix ``X^T X / count`` on ``device``; the segment lets go of it."""
        assert self.gram is not None
        gram, self.gram = self.gram, None
        return gram.to(device).div_(max(self.count, 1))


class Collector:
    """Forward hooks that accumulate the input statistics of a set of layers."""

    def __init__(self, model: nn.Module, layers: Sequence[LayerCandidate]) -> None:
        self.token_mask: torch.Tensor | None = None
        self.segments: dict[str, list[Segment]] = {}
        self._handles: list[Any] = []
        modules = dict(model.named_modules())
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
                self.segments[cand.param] = [Segment(slice(None))]
                self._handles.append(module.register_forward_hook(self._linear_hook(cand)))

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Drop padded positions (attention mask 0) from token inputs ``[B, T, ...]``."""
        mask = self.token_mask
        if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x[mask.to(torch.bool)]
        return x

    def _linear_hook(self, cand: LayerCandidate) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            if cand.kind == CONV and isinstance(module, nn.modules.conv._ConvNd):
                columns = conv_columns(module, x)
            else:
                columns = self._tokens(x).reshape(-1, x.shape[-1])
            self.segments[cand.param][0].add(columns)

        return hook

    def _hook_attention(self, module: nn.Module, cands: list[LayerCandidate]) -> None:
        embed = int(getattr(module, "embed_dim", 0))
        sources: dict[str, list[tuple[slice, int]]] = {
            "in_proj_weight": [(slice(0, embed), 0), (slice(embed, 2 * embed), 1), (slice(2 * embed, 3 * embed), 2)],
            "q_proj_weight": [(slice(None), 0)],
            "k_proj_weight": [(slice(None), 1)],
            "v_proj_weight": [(slice(None), 2)],
        }
        routes: list[tuple[str, int, int]] = []
        for cand in cands:
            attr = cand.param.rsplit(".", 1)[-1]
            parts = sources.get(attr, [])
            self.segments[cand.param] = [Segment(rows) for rows, _ in parts]
            routes.extend((cand.param, i, which) for i, (_, which) in enumerate(parts))
        batch_first = bool(getattr(module, "batch_first", False))

        def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            names = ("query", "key", "value")
            inputs = [args[i] if i < len(args) else kwargs.get(names[i]) for i in range(3)]
            mask = kwargs.get("key_padding_mask")
            for param, index, which in routes:
                x = inputs[which]
                if not isinstance(x, torch.Tensor):
                    continue
                if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and x.dim() == 3 and which > 0:
                    keep = ~(mask if batch_first else mask.t())
                    if tuple(keep.shape) == tuple(x.shape[:2]):
                        x = x[keep]
                self.segments[param][index].add(x.reshape(-1, x.shape[-1]))

        self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

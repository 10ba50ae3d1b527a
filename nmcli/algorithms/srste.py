"""SR-STE: the sparse-refined straight-through estimator (DESIGN.md section 4; Zhou et al., ICLR 2021).

The forward pass uses the masked weight ``W~ = M(W) ⊙ W``; the mask ``M`` is recomputed from
the dense weight ``W`` every ``mask_interval`` optimizer steps. The backward pass sends the
gradient of ``W~`` straight through to every element of ``W`` and adds the sparse-refined term
on the pruned elements::

    grad(W) = grad(W~) + lambda_w * (1 - M) ⊙ W

``lambda_w = 0`` is vanilla STE. :class:`SparseTraining` applies this to any prunable layer
(Linear, ConvNd, transformers Conv1D, ``nn.MultiheadAttention`` projections) of an unmodified
model through ``torch.nn.utils.parametrize``: the optimizer steps on the dense weight, while the
model's own code keeps reading ``module.weight`` and gets the masked one.

The refinement term can be added in the backward pass (``refine_in_backward=True``, the default:
plain training loops need no change; it is a gradient hook on the dense weight, so it is added
once per backward even when the model reads the weight several times per forward, as MoE
experts do with ``W[e]`` for every expert) or once per optimizer step with
:meth:`SparseTraining.add_refinement` (what ``nmcli finetune`` does, so that gradient
accumulation, data-parallel averaging and fp16 loss scaling never scale or repeat it).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from nmcli.errors import CheckpointError
from nmcli.formats.checkpoint import LayerEntry
from nmcli.nm.masks import apply_mask, nm_mask
from nmcli.nm.pattern import Pattern

DEFAULT_LAMBDA_W = 2e-4


class _SrsteFunction(torch.autograd.Function):
    """``W -> M ⊙ W`` whose backward is ``grad + lambda_w * (1 - M) ⊙ W``."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, mask: torch.Tensor, lambda_w: float) -> torch.Tensor:
        ctx.lambda_w = lambda_w
        if lambda_w:
            ctx.save_for_backward(weight, mask)
        return apply_mask(weight, mask)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if not ctx.lambda_w:
            return grad, None, None
        weight, mask = ctx.saved_tensors
        return refined_grad(grad, weight, mask, ctx.lambda_w), None, None


def refined_grad(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, lambda_w: float) -> torch.Tensor:
    """``grad + lambda_w * (1 - mask) ⊙ weight``: the SR-STE gradient of the dense weight."""
    if not lambda_w:
        return grad
    return grad + lambda_w * torch.where(mask, torch.zeros_like(weight), weight).to(grad.dtype)


def srste(weight: torch.Tensor, mask: torch.Tensor, lambda_w: float = DEFAULT_LAMBDA_W) -> torch.Tensor:
    """The masked weight ``M ⊙ W`` with SR-STE's backward (``lambda_w=0``: plain STE).

    Args:
        weight: the dense weight ``W``.
        mask: boolean mask ``M`` of the same shape (True: kept).
        lambda_w: the sparse-refined decay on pruned elements.
    """
    return _SrsteFunction.apply(weight, mask, float(lambda_w))


class NMParametrization(nn.Module):
    """The parametrization that ``torch.nn.utils.parametrize`` puts on one weight.

    Holds the current mask as a non-persistent buffer (it never appears in state dicts) and
    returns ``srste(W, mask, lambda_w)``.
    """

    def __init__(self, mask: torch.Tensor, pattern: Pattern, axis: int, lambda_w: float) -> None:
        super().__init__()
        self.pattern = pattern
        self.axis = axis
        self.lambda_w = float(lambda_w)
        self.register_buffer("mask", mask.to(torch.bool).clone(), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        assert isinstance(mask, torch.Tensor)
        return srste(weight, mask, self.lambda_w)


@dataclass
class SparseParam:
    """One weight under SR-STE: its state-dict name, owning module and attribute, and parametrization."""

    param: str
    module: nn.Module
    attr: str
    parametrization: NMParametrization
    hook: Any = None  # the refinement's gradient hook (refine_in_backward), removed with the parametrization

    @property
    def dense(self) -> nn.Parameter:
        """The dense weight the optimizer steps on."""
        original: nn.Parameter = self.module.parametrizations[self.attr].original  # type: ignore[union-attr,index]
        return original

    @property
    def mask(self) -> torch.Tensor:
        mask = self.parametrization.mask
        assert isinstance(mask, torch.Tensor)
        return mask


class SparseTraining:
    """SR-STE sparse training of an unmodified model.

    Args:
        model: the model; its pruned weights hold the **dense** values to start from.
        layers: the checkpoint's layer entries (parameter name, pattern, axis).
        masks: starting masks by parameter name; missing ones are computed from the dense weights.
        lambda_w: SR-STE's decay of pruned weights (0: plain STE).
        mask_interval: recompute the masks from the dense weights every this many steps.
        refine_in_backward: add the SR-STE term in the backward pass; when False, call
            :meth:`add_refinement` once before every optimizer step instead.
        step: the number of optimizer steps already done (when resuming).

    Example:
        >>> sparse = SparseTraining(model, ckpt.meta.layers, ckpt.masks)
        >>> loss.backward(); optimizer.step(); sparse.step()
        >>> sparse.remove()  # the model holds its dense weights again
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[LayerEntry],
        masks: Mapping[str, torch.Tensor] | None = None,
        *,
        lambda_w: float = DEFAULT_LAMBDA_W,
        mask_interval: int = 1,
        refine_in_backward: bool = True,
        step: int = 0,
    ) -> None:
        if mask_interval < 1:
            raise ValueError("mask_interval must be at least 1")
        self.model = model
        self.lambda_w = float(lambda_w)
        self.mask_interval = int(mask_interval)
        self.refine_in_backward = refine_in_backward
        self.steps = int(step)
        self.params: list[SparseParam] = []
        self._order = list(model.state_dict())
        modules = dict(model.named_modules())
        for entry in layers:
            module_name, _, attr = entry.param.rpartition(".")
            module = modules.get(module_name)
            weight = getattr(module, attr, None) if module is not None else None
            if module is None or not isinstance(weight, torch.Tensor):
                raise CheckpointError(f"the model has no weight {entry.param} that the checkpoint prunes: check --arch")
            if tuple(weight.shape) != entry.shape:
                raise CheckpointError(
                    f"{entry.param} has shape {tuple(weight.shape)} in the model but {entry.shape} in the checkpoint"
                )
            pattern = entry.pattern
            given = masks.get(entry.param) if masks is not None else None
            mask = given.to(weight.device) if given is not None else nm_mask(weight, pattern, entry.axis)
            # Plain STE in the forward; the refinement goes on the dense weight's gradient, once.
            para = NMParametrization(mask, pattern, entry.axis, 0.0).to(weight.device)
            parametrize.register_parametrization(module, attr, para)
            sparse_param = SparseParam(entry.param, module, attr, para)
            if refine_in_backward and self.lambda_w:
                sparse_param.hook = sparse_param.dense.register_hook(_refinement_hook(sparse_param, self.lambda_w))
            self.params.append(sparse_param)

    def __iter__(self) -> Iterator[SparseParam]:
        return iter(self.params)

    @torch.no_grad()
    def update_masks(self) -> None:
        """Recompute every mask from its current dense weight (a sharded one: each rank on its own rows)."""
        for sp in self.params:
            sp.mask.copy_(_mask_of(sp))

    def step(self) -> bool:
        """Count one optimizer step; recompute the masks when the interval is reached. Returns whether it did."""
        self.steps += 1
        if self.steps % self.mask_interval == 0:
            self.update_masks()
            return True
        return False

    @torch.no_grad()
    def add_refinement(self) -> None:
        """Add ``lambda_w * (1 - M) ⊙ W`` to each dense weight's ``.grad`` (once per optimizer step)."""
        if self.refine_in_backward or not self.lambda_w:
            return
        for sp in self.params:
            dense = sp.dense
            if dense.grad is None:
                dense.grad = torch.zeros_like(dense)
            if _is_sharded(dense):  # FSDP2: this rank's rows of the weight, its gradient and the mask
                local, rows = _local_rows(dense)
                grad = dense.grad.to_local()  # type: ignore[attr-defined]
                grad.copy_(refined_grad(grad, local, sp.mask[rows], self.lambda_w))
                continue
            dense.grad.copy_(refined_grad(dense.grad, dense, sp.mask, self.lambda_w))

    def masks(self) -> dict[str, torch.Tensor]:
        """The masks in use, by parameter name (CPU copies)."""
        return {sp.param: sp.mask.detach().cpu().clone() for sp in self.params}

    def final_masks(self) -> dict[str, torch.Tensor]:
        """Masks recomputed from the current dense weights (CPU)."""
        return {sp.param: _mask_of(sp).cpu() for sp in self.params}

    def dense_weights(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """The dense weights, by parameter name (CPU copies; sharded ones gathered one at a time).

        Args:
            keep: False on the ranks that only take part in gathering sharded weights (returns {}).
        """
        return dict(self.iter_dense(keep))

    def iter_dense(self, keep: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """The dense weights one at a time (a sharded one gathered when reached), for writers that stream.

        Every rank must drain it (the gathers are collectives); ranks with ``keep=False`` get nothing.
        """
        for sp in self.params:
            full = _full(sp.dense.detach())
            if keep:
                yield sp.param, full.cpu().clone()

    def state_dict(self, masks: Mapping[str, torch.Tensor] | None = None, keep: bool = True) -> dict[str, torch.Tensor]:
        """The model's state dict under its own names, with effective weights ``M ⊙ W`` (CPU).

        Sharded (FSDP2) tensors are gathered one at a time, so no rank holds a second copy of the model.

        Args:
            masks: the masks to apply; by default the ones in use.
            keep: False on the ranks that only take part in gathering sharded tensors (returns {}).
        """
        out = dict(self.iter_state(masks, keep))
        rank = {name: i for i, name in enumerate(self._order)}
        return dict(sorted(out.items(), key=lambda kv: rank.get(kv[0], len(rank))))

    def iter_state(
        self, masks: Mapping[str, torch.Tensor] | None = None, keep: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """:meth:`state_dict` one tensor at a time, in the model's ``state_dict`` order (a sharded tensor
        gathered when reached), so a writer that streams never holds the whole model.

        Every rank must drain it (the gathers are collectives); ranks with ``keep=False`` get nothing.
        """
        renames = {f"{_prefix(sp)}parametrizations.{sp.attr}.original": sp.param for sp in self.params}
        use = masks if masks is not None else self.masks()
        for name, value in self.model.state_dict().items():
            target = renames.get(name, name)
            value = _full(value.detach())
            if not keep:
                continue
            value = value.cpu()
            if target in use:
                value = apply_mask(value, use[target].to(torch.bool))
            yield target, value.clone()

    def remove(self) -> None:
        """Remove the parametrizations: each module holds its dense weight as a plain parameter again."""
        for sp in self.params:
            if sp.hook is not None:
                sp.hook.remove()
            if parametrize.is_parametrized(sp.module, sp.attr):
                parametrize.remove_parametrizations(sp.module, sp.attr, leave_parametrized=False)
        self.params = []


def _refinement_hook(sp: SparseParam, lambda_w: float) -> Any:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return refined_grad(grad, sp.dense.detach(), sp.mask, lambda_w)

    return hook


def _is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2-sharded parameter); never imports torch.distributed itself."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded one gathered from every rank (a collective), others as they are.

    The gather is waited for here, on every rank: ``full_tensor`` returns an async tensor, and a rank
    that drops it unwaited leaves the collective's work for gloo's worker thread to free later, which
    aborts the process ("terminate called without an active exception") if the interpreter is exiting.
    """
    if not _is_sharded(tensor):
        return tensor
    full = tensor.full_tensor()  # type: ignore[attr-defined]
    wait = getattr(full, "wait", None)
    return wait() if callable(wait) else full


def _local_rows(dense: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """This rank's shard of a dim-0-sharded DTensor and the rows of the whole tensor it holds.

    FSDP2 splits dim 0 like ``torch.chunk``: chunks of ``ceil(rows / ranks)``, the last ones shorter or empty.
    """
    local: torch.Tensor = dense.to_local()  # type: ignore[attr-defined]
    mesh = dense.device_mesh  # type: ignore[attr-defined]
    chunk = -(-dense.shape[0] // mesh.size())
    start = min(mesh.get_local_rank() * chunk, dense.shape[0])
    return local, slice(start, start + local.shape[0])


def _mask_of(sp: SparseParam) -> torch.Tensor:
    """The N:M mask of the current dense weight; a sharded weight's is computed by each rank on its own rows
    (whole N:M groups: see ``nmcli.pipelines.distributed``) and gathered."""
    dense, pattern, axis = sp.dense.detach(), sp.parametrization.pattern, sp.parametrization.axis
    if not _is_sharded(dense):
        return nm_mask(dense, pattern, axis)
    from torch.distributed.tensor import DTensor

    assert isinstance(dense, DTensor)
    local, _ = _local_rows(dense)
    mask = nm_mask(local, pattern, axis) if local.numel() else torch.zeros(local.shape, dtype=torch.bool)
    shards = DTensor.from_local(
        mask.to(torch.uint8), dense.device_mesh, dense.placements, shape=dense.shape, stride=dense.stride()
    )
    return _full(shards).to(torch.bool)


def _prefix(sp: SparseParam) -> str:
    module_name = sp.param.rpartition(".")[0]
    return f"{module_name}." if module_name else ""

"""Layer discovery and N:M eligibility: which modules of a model are pruned, and why others are not.

Prunable by default: Linear, Conv1d/2d/3d with groups=1, attention projections, transformers
Conv1D, and MoE expert stacks, whose input dimension is a multiple of M (DESIGN.md section 3).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: parsing patterns and reading headers stay torch-free
    import torch
    from torch import nn
from nmcli.nm.pattern import Pattern

LINEAR = "linear"
CONV = "conv"
HF_CONV1D = "hf_conv1d"
MHA = "attention"


@dataclass(frozen=True)
class LayerCandidate:
    """A weight that N:M could apply to, and whether it does under the current pattern and filters."""

    module: str
    param: str
    kind: str
    shape: tuple[int, ...]
    axis: int
    eligible: bool
    reason: str

    @property
    def input_size(self) -> int:
        return self.shape[self.axis] if self.shape else 0


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) stores its weight [in, out]; matched by name so that
    # transformers stays an optional import.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _module_kind(module: nn.Module) -> str | None:
    from torch import nn

    original = getattr(module, "original_name", None)  # TorchScript keeps the Python class name
    name = original if isinstance(original, str) else type(module).__name__
    if isinstance(module, nn.Linear) or name in {"Linear", "NonDynamicallyQuantizableLinear"}:
        return LINEAR
    if isinstance(module, nn.modules.conv._ConvNd) or name in {"Conv1d", "Conv2d", "Conv3d"}:
        return CONV
    if _is_hf_conv1d(module):
        return HF_CONV1D
    if isinstance(module, nn.MultiheadAttention) or name == "MultiheadAttention":
        return MHA
    return None


def _shape_reason(kind: str, shape: Sequence[int], axis: int, groups: int, transposed: bool, pattern: Pattern) -> str:
    if transposed:
        return "transposed convolution: its reduction axis is not the stored input axis"
    if groups != 1:
        return f"grouped or depthwise convolution (groups={groups})"
    if len(shape) < 2:
        return f"{kind} weight of shape {tuple(shape)} has no input dimension"
    if shape[axis] % pattern.m:
        return f"input dimension {shape[axis]} is not a multiple of M={pattern.m}"
    return ""


EXPERTS = "experts"
ROUTER = "router"
ROUTER_REASON = "router"
_ROUTER_CHILD = re.compile(r"(^|_)(gate|router|gating)$|^router")


def _class_name(module: nn.Module) -> str:
    original = getattr(module, "original_name", None)  # TorchScript keeps the Python class name
    return original if isinstance(original, str) else type(module).__name__


def _expert_stacks(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The module's own floating Parameters of 3+ dimensions, when it is an experts module (else [])."""
    if not (
        _class_name(module).endswith("Experts") or (hasattr(module, "num_experts") and hasattr(module, "is_transposed"))
    ):
        return []
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.dim() >= 3 and p.is_floating_point()]


def expert_axis(module: nn.Module, ndim: int) -> int:
    """The input (reduction) axis of each matrix of an expert stack with ``ndim`` dimensions (see the rule above)."""
    return ndim - 2 if bool(getattr(module, "is_transposed", False)) else ndim - 1


def _router_modules(model: nn.Module, pattern: Pattern) -> set[str]:
    """Names of the routing modules of ``model`` (see the rule above)."""
    from torch import nn

    routers: set[str] = set()
    for name, module in model.named_modules():
        if _class_name(module).endswith(("Router", "Gating")):
            routers.add(name)
        children = dict(module.named_children())
        if not any(
            _expert_stacks(child) or (child_name == "experts" and isinstance(child, nn.ModuleList))
            for child_name, child in children.items()
        ):
            continue
        for child_name, child in children.items():
            few_outputs = _module_kind(child) == LINEAR and int(getattr(child, "out_features", pattern.m)) < pattern.m
            if _ROUTER_CHILD.search(child_name) or few_outputs:
                routers.add(_join(name, child_name))
    return routers


def _in_any(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or not p for p in prefixes)


def _moe_candidates(module_name: str, module: nn.Module, pattern: Pattern, router: bool) -> Iterator[LayerCandidate]:
    """Candidates of a module no other kind covers: expert stacks, and the weights of non-Linear routers."""
    for attr, weight in _expert_stacks(module):
        shape = tuple(weight.shape)
        axis = expert_axis(module, weight.dim())
        reason = ROUTER_REASON if router else _shape_reason(EXPERTS, shape, axis, 1, False, pattern)
        yield LayerCandidate(module_name, _join(module_name, attr), EXPERTS, shape, axis, not reason, reason)
    if router and _module_kind(module) is None:
        for attr, weight in module.named_parameters(recurse=False):
            if weight.dim() >= 2 and weight.is_floating_point():
                shape = tuple(weight.shape)
                yield LayerCandidate(
                    module_name, _join(module_name, attr), ROUTER, shape, weight.dim() - 1, False, ROUTER_REASON
                )


def _candidates_from_modules(model: nn.Module, pattern: Pattern) -> Iterator[tuple[LayerCandidate, str]]:
    import torch
    from torch import nn

    embedding_params = {
        id(p) for mod in model.modules() if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) for p in mod.parameters()
    }
    routers = _router_modules(model, pattern)
    for module_name, module in model.named_modules():
        kind = _module_kind(module)
        is_router = bool(routers) and _in_any(module_name, routers)
        for moe in _moe_candidates(module_name, module, pattern, is_router):
            yield moe, ""
        if kind is None:
            continue
        if kind == MHA:
            weights = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"]
            groups, transposed = 1, False
        else:
            weights = ["weight"]
            groups = int(getattr(module, "groups", 1) or 1)
            transposed = bool(getattr(module, "transposed", False))
        for attr in weights:
            weight = getattr(module, attr, None)
            if not isinstance(weight, torch.Tensor):
                continue
            shape = tuple(weight.shape)
            axis = 0 if kind == HF_CONV1D else 1
            reason = _shape_reason(kind, shape, axis, groups, transposed, pattern)
            if is_router:
                reason = ROUTER_REASON
            elif not reason and id(weight) in embedding_params:
                reason = "weight is tied to an embedding"
            yield (
                LayerCandidate(module_name, _join(module_name, attr), kind, shape, axis, not reason, reason),
                "",
            )


_FX_LINEAR = {"aten.linear.default"}
_FX_CONV = {"aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.convolution.default"}


def _candidates_from_graph(model: torch.fx.GraphModule, pattern: Pattern) -> Iterator[tuple[LayerCandidate, str]]:
    import torch.fx

    params = dict(model.named_parameters())
    for node in model.graph.nodes:
        if node.op != "call_function" or len(node.args) < 2:
            continue
        target = str(node.target)
        if target not in _FX_LINEAR and target not in _FX_CONV:
            continue
        weight_node = node.args[1]
        if not isinstance(weight_node, torch.fx.Node) or weight_node.op != "get_attr":
            continue
        param = str(weight_node.target)
        if param not in params:
            continue
        shape = tuple(params[param].shape)
        kind = LINEAR if target in _FX_LINEAR else CONV
        groups, transposed = 1, False
        if kind == CONV:
            if target == "aten.convolution.default":
                transposed = bool(node.args[6]) if len(node.args) > 6 else False
                groups = int(node.args[8]) if len(node.args) > 8 else 1
            else:
                groups = int(node.args[6]) if len(node.args) > 6 else int(node.kwargs.get("groups", 1))
        reason = _shape_reason(kind, shape, 1, groups, transposed, pattern)
        module = param.rsplit(".", 1)[0] if "." in param else ""
        yield LayerCandidate(module, param, kind, shape, 1, not reason, reason), ""


def _matches(name: str, globs: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def find_layers(
    model: nn.Module,
    pattern: Pattern,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[LayerCandidate]:
    """Every Linear/ConvNd/Conv1D/attention weight and MoE expert stack in ``model``, with eligibility and a reason for skips.

    MoE routers are listed and never eligible (reason ``router``); expert stacks are pruned per
    expert along each matrix's input dimension (the rule above :data:`EXPERTS`).

    ``include``/``exclude`` are globs over module names (``encoder.*.attention.*``); a module matching
    an ``exclude`` glob, or no ``include`` glob when some are given, is skipped with that reason.
    Biases, norms and embeddings are never candidates. Works on eager modules, TorchScript modules
    (by their original class names) and ``torch.export`` graph modules (by their aten calls).
    """
    import torch.fx

    has_modules = any(_module_kind(m) is not None for m in model.modules())
    if not has_modules and isinstance(model, torch.fx.GraphModule):
        found = _candidates_from_graph(model, pattern)
    else:
        found = _candidates_from_modules(model, pattern)
    layers: list[LayerCandidate] = []
    seen: set[str] = set()
    for cand, _ in found:
        if cand.param in seen:
            continue
        seen.add(cand.param)
        layers.append(filtered_candidates(cand, include, exclude))
    return layers


def filtered_candidates(cand: LayerCandidate, include: Sequence[str], exclude: Sequence[str]) -> LayerCandidate:
    """``cand``, made ineligible when ``--include`` globs are given and none matches, or an ``--exclude`` glob does."""
    if cand.eligible and include and not (_matches(cand.module, include) or _matches(cand.param, include)):
        return LayerCandidate(
            cand.module, cand.param, cand.kind, cand.shape, cand.axis, False, "not matched by --include"
        )
    if cand.eligible and exclude and (_matches(cand.module, exclude) or _matches(cand.param, exclude)):
        return LayerCandidate(cand.module, cand.param, cand.kind, cand.shape, cand.axis, False, "matched by --exclude")
    return cand


# TensorRT's sparse kernels need the reduction dimension (and output channels) in multiples the
# kernels tile on; small layers are ignored by its sparse tactic selection.
def tensorrt_usable(shape: Sequence[int], axis: int, compliant_24: bool) -> bool:
    """Whether TensorRT's 2:4 sparse kernels could take this weight.

    TensorRT applies structured sparsity to Convolution and FullyConnected/MatMul weights that are
    2:4 along the reduction axis; it skips layers whose channel counts are too small or not aligned.
    We report the conservative condition: 2:4 compliant, reduction size a multiple of 32 and at
    least 64, and output size a multiple of 32.
    """
    return not tensorrt_reason(shape, axis, compliant_24)


def tensorrt_reason(shape: Sequence[int], axis: int, compliant_24: bool) -> str:
    """Why TensorRT's 2:4 sparse kernels could not take this weight ("" when they could; the
    conditions of :func:`tensorrt_usable`)."""
    if len(shape) < 2:
        return "not a matrix"
    if not compliant_24:
        return "not 2:4 along its input dimension"
    k = shape[axis]
    out_axis = 1 if axis == 0 else 0
    if len(shape) >= 3 and axis == len(shape) - 1:  # an expert stack [E, out, in]
        out_axis = axis - 1
    n_out = shape[out_axis]
    if k < 64 or k % 32:
        return f"input size {k} is not a multiple of 32" if k % 32 else f"input size {k} is below 64"
    if n_out % 32:
        return f"output size {n_out} is not a multiple of 32"
    return ""


def first_linear_input(model: nn.Module) -> int | None:
    """``in_features`` of the model's first layer when it is an ``nn.Linear`` (registration order) and
    the model runs on a ``1 x in_features`` float input; else None. The model runs once, on zeros,
    on its own device (never on the meta device), its prints sent to stderr.
    """
    import contextlib
    import sys

    import torch
    from torch import nn

    first = next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)
    if not isinstance(first, nn.Linear) or first.weight.is_meta or not first.weight.is_floating_point():
        return None
    probe = torch.zeros(1, first.in_features, dtype=first.weight.dtype, device=first.weight.device)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
            model(probe)
    except Exception:  # noqa: BLE001 - not the model's input: the caller asks for --input-shape
        return None
    return int(first.in_features)

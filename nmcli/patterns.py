"""N:M patterns: parsing, mask computation, layer eligibility and compliance checks.

This module owns the N:M rules of DESIGN.md section 3. A weight is split into groups of M
consecutive elements along its input (reduction) axis, and each group keeps its N
largest-magnitude elements, ties going to the lower index. Everything is vectorized: no Python
loop ever runs over groups.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from nmcli.errors import PatternError

if TYPE_CHECKING:  # torch is imported where it is used: parsing patterns and reading headers stay torch-free
    import torch
    from torch import nn

MAX_M = 32
_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """An N:M pattern: at most ``n`` non-zeros in every group of ``m`` consecutive weights."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (0 < self.n < self.m <= MAX_M):
            raise PatternError(
                f"pattern {self.n}:{self.m} is not supported: use N:M with 0 < N < M <= {MAX_M}, e.g. 2:4"
            )

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def slug(self) -> str:
        """File-name form, e.g. ``2of4``."""
        return f"{self.n}of{self.m}"

    @property
    def accelerated(self) -> bool:
        """Whether NVIDIA sparse tensor cores (Ampere and later) accelerate this pattern."""
        return self.n == 2 and self.m == 4

    @property
    def density(self) -> float:
        return self.n / self.m


TENSOR_CORE_PATTERN = Pattern(2, 4)


def parse_pattern(text: str | Pattern) -> Pattern:
    """Parse ``"N:M"`` (e.g. ``"2:4"``) into a :class:`Pattern`.

    Raises:
        PatternError: the text is not of the form N:M with 0 < N < M <= 32.
    """
    if isinstance(text, Pattern):
        return text
    match = _PATTERN_RE.match(str(text))
    if not match:
        raise PatternError(f"malformed pattern {text!r}: write it as N:M, e.g. 2:4 or 1:4")
    return Pattern(int(match.group(1)), int(match.group(2)))


def pattern_note(pattern: Pattern) -> str | None:
    """A one-line note for patterns that sparse tensor cores do not accelerate, else None."""
    if pattern.accelerated:
        return None
    return (
        f"{pattern} sparsity is not accelerated by NVIDIA sparse tensor cores (only 2:4 is); "
        "it reduces parameters but not latency"
    )


def _grouped(tensor: torch.Tensor, m: int, axis: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Move ``axis`` last and split it into groups of ``m``: returns ``[..., G, m]`` and the moved shape."""
    axis = axis % tensor.dim()
    if tensor.shape[axis] % m:
        raise PatternError(
            f"dimension {axis} of a {tuple(tensor.shape)} tensor has size {tensor.shape[axis]}, not a multiple of M={m}"
        )
    moved = tensor.movedim(axis, -1)
    moved_shape = tuple(moved.shape)
    return moved.reshape(*moved_shape[:-1], moved_shape[-1] // m, m), moved_shape


# Groups per slice in nm_mask: the integer keys of one slice (int32 or int64 per element) stay
# within a few MiB, so every pass over them runs in cache, whatever the weight's size.
_MASK_CHUNK_GROUPS = 1 << 16

# Float dtype name -> (same-size integer dtype, key dtype, bits of +infinity). The bits of |x| order
# like |x| itself (IEEE floats without their sign), so the mask needs no float compare and no sort.
_KEY_TYPES: dict[str, tuple[str, str, int]] = {
    "float16": ("int16", "int32", 0x7C00),
    "bfloat16": ("int16", "int32", 0x7F80),
    "float32": ("int32", "int64", 0x7F80_0000),
}


class TopNSelector:
    """The N:M rule on slices of groups: ``select(groups [G, m], out=keep [G, m])``, without sorting.

    For float16, bfloat16 and float32 every element becomes one integer key: the bits of ``|x|``
    (NaN canonicalized just above infinity, as a sort places it), shifted left, with
    ``m - 1 - index`` in the low bits. Keys in a group are then distinct, a lower index wins a tie
    in magnitude, and an element is kept exactly when its key is at least the group's ``n``-th
    largest: the same mask as a stable descending sort, at a fraction of its cost (2:4 takes a
    min/max network, 1:M a max, M-1:M a min). Other dtypes (float64 scores) sort. The key buffers
    are reused across slices of at most ``groups`` groups.
    """

    def __init__(self, pattern: Pattern, dtype: torch.dtype, device: torch.device | str, groups: int) -> None:
        import torch

        self.pattern = pattern
        self.dtype = dtype
        spec = _KEY_TYPES.get(str(dtype).removeprefix("torch."))
        self._keyed = spec is not None
        if spec is None:
            return
        bits_name, key_name, infinity = spec
        self._bits = getattr(torch, bits_name)
        key_dtype = getattr(torch, key_name)
        self._shift = max(1, (pattern.m - 1).bit_length())
        self._magnitude = (1 << (8 * torch.empty((), dtype=dtype).element_size() - 1)) - 1
        self._nan = infinity + 1
        self._keys = torch.empty(groups, pattern.m, dtype=key_dtype, device=device)
        # m-1-index for every element of a slice, materialized: a broadcast OR is ~7x slower on CPU
        self._index = torch.arange(pattern.m - 1, -1, -1, dtype=key_dtype, device=device).repeat(groups, 1)
        self._threshold = torch.empty(groups, dtype=key_dtype, device=device)
        self._spare = torch.empty(groups, dtype=key_dtype, device=device)
        self._low = torch.empty(groups, dtype=key_dtype, device=device)

    def __call__(self, groups: torch.Tensor, out: torch.Tensor) -> None:
        import torch

        n, m = self.pattern.n, self.pattern.m
        if not self._keyed:
            order = torch.sort(groups.abs(), dim=-1, descending=True, stable=True).indices[:, :n]
            out.zero_().scatter_(-1, order, True)
            return
        count = groups.shape[0]
        keys, t = self._keys[:count], self._threshold[:count]
        keys.copy_(groups.view(self._bits))
        keys.bitwise_and_(self._magnitude).clamp_max_(self._nan).bitwise_left_shift_(self._shift)
        keys.bitwise_or_(self._index[:count])
        if n == 1:
            torch.amax(keys, 1, out=t)
        elif n == m - 1:  # every key but the smallest
            torch.amin(keys, 1, out=t)
            torch.gt(keys, t[:, None], out=out)
            return
        elif (n, m) == (2, 4):  # the second largest of four: max(min(max a,b; max c,d), max(min a,b; min c,d))
            spare, low = self._spare[:count], self._low[:count]
            a, b, c, d = keys.unbind(1)
            torch.maximum(a, b, out=t)
            torch.maximum(c, d, out=spare)
            torch.minimum(t, spare, out=t)
            torch.minimum(a, b, out=low)
            torch.minimum(c, d, out=spare)
            torch.maximum(spare, low, out=spare)
            torch.maximum(t, spare, out=t)
        else:
            t.copy_(torch.topk(keys, n, dim=1).values[:, n - 1])
        torch.ge(keys, t[:, None], out=out)  # not column by column: threads would share the output's cache lines


def nm_mask(weight: torch.Tensor, pattern: Pattern, axis: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest-magnitude elements of every group of ``m`` along ``axis``.

    Ties go to the lower index (the order of a stable descending sort). Computed by
    :class:`TopNSelector` in slices of groups, so the temporaries stay small.
    """
    import torch

    if weight.dim() == 0:
        raise PatternError("cannot compute an N:M mask for a scalar")
    groups, moved_shape = _grouped(weight.detach(), pattern.m, axis)
    flat = groups.reshape(-1, pattern.m)
    keep = torch.empty(flat.shape, dtype=torch.bool, device=weight.device)
    chunk = min(_MASK_CHUNK_GROUPS, max(1, flat.shape[0]))
    select = TopNSelector(pattern, flat.dtype, weight.device, chunk)
    for start in range(0, flat.shape[0], chunk):
        select(flat[start : start + chunk], out=keep[start : start + chunk])
    return keep.reshape(moved_shape).movedim(-1, axis % weight.dim()).contiguous()


_SAME_SIZE_INT = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}  # torch dtype names, by element size


def stored_nonzero(values: torch.Tensor) -> torch.Tensor:
    """Elements that are not exactly ``+0.0`` (``-0.0`` counts as non-zero), as a boolean tensor.

    For floats this compares the bit patterns with zero: one pass, no temporaries beyond the result.
    """
    import torch

    if values.is_floating_point() and values.element_size() in _SAME_SIZE_INT:
        return values.view(getattr(torch, _SAME_SIZE_INT[values.element_size()])).ne(0)
    return values.ne(0)


def group_counts(values: torch.Tensor, m: int, axis: int) -> torch.Tensor:
    """Number of non-zero elements (``-0.0`` counts as non-zero) in every group of ``m`` along ``axis``."""
    import torch

    groups, _ = _grouped(stored_nonzero(values), m, axis)
    return groups.sum(dim=-1, dtype=torch.int32)


def is_compliant(values: torch.Tensor, pattern: Pattern, axis: int) -> bool:
    """True when every group of ``m`` along ``axis`` has at most ``n`` non-zeros (a mask: at most ``n`` kept)."""
    if values.dim() == 0 or values.shape[axis % values.dim()] % pattern.m:
        return False
    return bool(group_counts(values, pattern.m, axis).le(pattern.n).all())


# Elements per slice in l1_norm: bounds its float64 temporaries to 8 MiB whatever the tensor's size.
_NORM_CHUNK = 1 << 20


def l1_norm(values: torch.Tensor) -> float:
    """``sum |x|`` of a tensor of any size and dtype, in float64 over slices.

    One float32 reduction over a whole large tensor both copies it (4 bytes per element) and loses
    accuracy (about 30% low on 131M elements); float64 slices keep both small.
    """
    import torch

    flat = values.detach().reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), _NORM_CHUNK):
        total += float(torch.linalg.vector_norm(flat[start : start + _NORM_CHUNK], 1, dtype=torch.float64))
    return total


def count_kept(mask: torch.Tensor) -> int:
    """The number of set elements of a boolean mask, without the int64 copy ``mask.sum()`` makes."""
    import torch

    return int(torch.count_nonzero(mask))


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Effective weight: the kept values, and exact ``+0.0`` (never ``-0.0``) where pruned.

    Without autograd, floats are masked as their bits (an integer multiply by the mask: all-zero
    bits where pruned), several times faster than ``where`` on CPU.
    """
    import torch

    if not (weight.requires_grad and torch.is_grad_enabled()) and weight.is_floating_point():
        bits = getattr(torch, _SAME_SIZE_INT.get(weight.element_size(), ""), None)
        if bits is not None:
            return (weight.view(bits) * mask).view(weight.dtype)
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


# --------------------------------------------------------------------------------------------
# The same checks on raw bits, with numpy: a memory-mapped safetensors tensor (no torch needed,
# bfloat16 and float8 included) or a torch tensor viewed as integers. ``-0.0`` is a bit pattern
# here: ``stored_nonzero`` counts it, ``nonzero`` does not, ``negative_zeros`` reports it.

# float dtype name -> (sign bit, bits that are all set in NaN and infinity and only there)
FLOAT_BITS: dict[str, tuple[int, int]] = {
    "float64": (1 << 63, 0x7FF0_0000_0000_0000),
    "float32": (1 << 31, 0x7F80_0000),
    "float16": (1 << 15, 0x7C00),
    "bfloat16": (1 << 15, 0x7F80),
    "float8_e5m2": (1 << 7, 0x7C),
    "float8_e4m3fn": (1 << 7, 0x7F),  # no infinity; NaN is S.1111.111
}
_UNSIGNED = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


@dataclass(frozen=True)
class TensorBits:
    """A tensor's elements as unsigned integers of the same size (``bits``), with its dtype name.

    ``dtype`` is torch's name without ``torch.`` (``float32``, ``bfloat16``, ``uint8``, ``bool``).
    """

    dtype: str
    bits: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.bits.shape)

    @property
    def floating(self) -> bool:
        return self.dtype in FLOAT_BITS

    @property
    def size(self) -> int:
        return int(self.bits.size)

    @classmethod
    def of_tensor(cls, tensor: torch.Tensor) -> TensorBits:
        """The bits of a torch tensor (copied to the CPU and made contiguous only when needed)."""
        import torch

        value = tensor.detach().to("cpu").contiguous()
        dtype = str(value.dtype).removeprefix("torch.")
        flat = value.reshape(-1).view(torch.uint8).numpy()
        return cls(dtype, flat.view(np.dtype(_UNSIGNED[value.element_size()])).reshape(tuple(value.shape)))

    def stored_nonzero(self) -> np.ndarray:
        """Elements that are not exactly ``+0.0`` (``-0.0`` counts as non-zero), like :func:`stored_nonzero`."""
        return self.bits != 0

    def nonzero(self) -> np.ndarray:
        """Elements that are not zero, ``-0.0`` counting as zero."""
        if self.floating:
            return (self.bits & self.bits.dtype.type(~FLOAT_BITS[self.dtype][0] & _ones(self.bits))) != 0
        return self.bits != 0

    def negative_zeros(self) -> int:
        """How many elements are ``-0.0`` (0 for integer tensors)."""
        if not self.floating:
            return 0
        return int(np.count_nonzero(self.bits == self.bits.dtype.type(FLOAT_BITS[self.dtype][0])))

    def nonfinite(self) -> bool:
        """Whether a floating tensor holds a NaN or an infinity (checked in slices of 16M elements)."""
        if not self.floating:
            return False
        special = self.bits.dtype.type(FLOAT_BITS[self.dtype][1])
        flat = self.bits.reshape(-1)
        step = 1 << 24
        return any(bool(((flat[i : i + step] & special) == special).any()) for i in range(0, flat.size, step))


def _ones(bits: np.ndarray) -> int:
    return (1 << (8 * bits.dtype.itemsize)) - 1


def array_group_counts(flags: np.ndarray, m: int, axis: int) -> np.ndarray:
    """Number of true ``flags`` in every group of ``m`` along ``axis`` (numpy), shape ``[..., G]``.

    Raises:
        PatternError: the axis does not hold groups of ``m``.
    """
    axis = axis % flags.ndim
    if flags.shape[axis] % m:
        raise PatternError(
            f"dimension {axis} of a {tuple(flags.shape)} tensor has size {flags.shape[axis]}, not a multiple of M={m}"
        )
    moved = np.moveaxis(flags, axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m).sum(axis=-1, dtype=np.int32)


@dataclass(frozen=True)
class BitsCompliance:
    """N:M state of one weight: ``sparsity`` (share of zeros, ``-0.0`` included), ``compliant``
    (every group of ``m`` along the axis has at most ``n`` non-zeros, ``-0.0`` counting as zero),
    ``compliant_24`` (the same for 2:4) and ``negative_zeros``."""

    sparsity: float
    compliant: bool
    compliant_24: bool
    negative_zeros: int


def bits_compliance(values: TensorBits, pattern: Pattern, axis: int) -> BitsCompliance:
    """Sparsity and N:M (and 2:4) compliance of a weight along ``axis``; ``-0.0`` counts as zero.

    ``-0.0`` is what folding a negative BatchNorm scale into a pruned weight gives, and Polygraphy
    and TensorRT count it as zero; it is reported in ``negative_zeros`` (sparse compressors that
    compare bit patterns count it as non-zero).
    """
    nonzero = values.nonzero()
    sparsity = 1.0 - int(np.count_nonzero(nonzero)) / values.size if values.size else 0.0

    def holds(p: Pattern) -> bool:
        if nonzero.ndim == 0 or nonzero.shape[axis] % p.m:
            return False
        return bool((array_group_counts(nonzero, p.m, axis) <= p.n).all())

    compliant = holds(pattern)
    compliant_24 = compliant if pattern == TENSOR_CORE_PATTERN else holds(TENSOR_CORE_PATTERN)
    return BitsCompliance(sparsity, compliant, compliant_24, values.negative_zeros())


# --------------------------------------------------------------------------------------------
# Eligibility: which layers are prunable, along which axis, and why not.

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


# --- Mixture-of-experts: expert stacks are prunable, routing never is -----------------------
#
# transformers 5 stores the experts of an MoE block (Mixtral, Qwen2/3-MoE, DeepSeek, OLMoE, ...)
# as one module holding floating Parameters of 3 or more dimensions, a stack of matrices applied
# one per expert: ``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``. The rule:
#
# * an *experts module* is a module whose class name ends in ``Experts``, or that carries
#   transformers' ``@use_experts_implementation`` attributes (``num_experts`` and
#   ``is_transposed``); each of its own floating Parameters with 3 or more dimensions is a
#   candidate of kind ``experts``, pruned N:M per expert matrix along that matrix's **input
#   dimension**: the last axis (``F.linear(x, W[e])``, ``W[e]`` is ``[out, in]``), or the axis
#   before it when the module says ``is_transposed`` (``x @ W[e]``, GPT-OSS ``[E, in, out]``).
#   Expert biases (2-D) are biases, never candidates.
# * routing is never pruned: in an *MoE block* (a module with an experts module, or a ModuleList
#   named ``experts``, among its children) every child named ``gate``, ``router``, ``gating``,
#   ``*_gate``, ``*_router``, ``*_gating`` or ``router*`` (``shared_expert_gate``, ``router_mlp``;
#   not ``gate_proj``), and every Linear child with fewer than M outputs, is a router; so is any
#   module whose class name ends in ``Router`` or ``Gating``. Their weights (Linear or not) are
#   listed and skipped with the reason ``router``.

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
        layers.append(_filtered(cand, include, exclude))
    return layers


def _filtered(cand: LayerCandidate, include: Sequence[str], exclude: Sequence[str]) -> LayerCandidate:
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
        return f"input size {k} is not a multiple of 32 that is at least 64"
    if n_out % 32:
        return f"output size {n_out} is not a multiple of 32"
    return ""


# --------------------------------------------------------------------------------------------
# Inferred layers: which tensors of a bare state dict are sparse layers, decided from the
# tensors alone (no architecture). Used by sad, inspect and prune --infer-layers on training
# checkpoints; --arch, when given, takes precedence. Output names this rule "inferred".

INFERRED = "inferred"
# Words of a tensor's name that mark embeddings, norms and positional tables (see infer_layers).
INFERRED_SKIP_SUBSTRINGS = ("embed", "norm")
INFERRED_SKIP_WORDS = ("bn", "ln", "pos")
INFERRED_SKIP_PREFIXES = ("position",)
# The group sizes M tried when a pattern is inferred from stored zeros.
INFERRED_MS = (2, 4, 8, 16, 32)
_WORD_SPLIT = re.compile(r"[._\-/]+")


def _is_weight_name(name: str) -> bool:
    return name == "weight" or name.endswith(".weight") or name.endswith("proj_weight")


def _skip_word(name: str) -> str | None:
    words = [w.rstrip("0123456789") for w in _WORD_SPLIT.split(name.lower())]
    for word in words[:-1] if words and words[-1] == "weight" else words:
        if any(s in word for s in INFERRED_SKIP_SUBSTRINGS) or word in INFERRED_SKIP_WORDS:
            return word
        if word.startswith(INFERRED_SKIP_PREFIXES):
            return word
    return None


def inferred_skip_reason(name: str, shape: Sequence[int], floating: bool, pattern: Pattern) -> str:
    """Why the tensor ``name`` is not an inferred sparse layer under ``pattern`` (empty when it is).

    The rule, in the order checked (the first that fails is the reason):

    1. a floating-point tensor;
    2. named ``*.weight`` (or ``weight``; ``*proj_weight`` for ``nn.MultiheadAttention``):
       biases, buffers and running statistics are not layers;
    3. 2 or more dimensions (1-D: biases, norm scales);
    4. not an embedding, norm or positional table by name: no word of the name (split at ``.``,
       ``_``, ``-``; lower case; trailing digits dropped, so ``bn1`` is ``bn``) contains
       ``embed`` or ``norm``, equals ``bn``, ``ln`` or ``pos``, or starts with ``position``;
    5. input dimension (dim 1) > 1 (a depthwise conv ``[C, 1, k, k]`` has 1);
    6. input dimension a multiple of M.

    Groups run along dim 1: Linear ``[out, in]``, ConvNd ``[out, in, *k]``. What the tensors
    cannot show, the rule cannot know: a grouped (not depthwise) conv, a transposed conv and
    transformers' ``Conv1D`` (GPT-2, ``[in, out]``) look like ordinary layers; a weight tied to
    an embedding is skipped only when the caller says so. Pass ``--arch`` for those models.
    """
    if not floating:
        return "not a floating-point tensor"
    if not _is_weight_name(name):
        return "not named *.weight (a bias, buffer or statistic)"
    if len(shape) < 2:
        return f"{len(shape)}-D (a bias or norm scale)"
    word = _skip_word(name)
    if word is not None:
        return f"an embedding, norm or positional table by name ({word!r})"
    if shape[1] <= 1:
        return f"input dimension {shape[1]} (a depthwise conv)"
    if shape[1] % pattern.m:
        return f"input dimension {shape[1]} is not a multiple of M={pattern.m}"
    return ""


def infer_layers(
    tensors: Iterable[tuple[str, Sequence[int], bool]],
    pattern: Pattern,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    tied: Iterable[str] = (),
) -> list[LayerCandidate]:
    """Decide from ``(name, shape, is_floating)`` alone which tensors are sparse layers (:func:`inferred_skip_reason`).

    Returns one :class:`LayerCandidate` per tensor, taken or skipped with its reason, in the
    given order, in the form :func:`find_layers` returns (``kind`` is ``"inferred"``, ``axis``
    1). ``include``/``exclude`` globs work as in :func:`find_layers`; names in ``tied`` (weights
    sharing storage with an embedding) are skipped.
    """
    tied_names = set(tied)
    layers: list[LayerCandidate] = []
    for name, shape, floating in tensors:
        shape = tuple(int(d) for d in shape)
        reason = inferred_skip_reason(name, shape, floating, pattern)
        if not reason and name in tied_names:
            reason = "weight is tied to an embedding"
        module = name.rsplit(".", 1)[0] if "." in name else ""
        cand = LayerCandidate(module, name, INFERRED, shape, 1, not reason, reason)
        layers.append(_filtered(cand, include, exclude))
    return layers


def most_nonzeros(values: torch.Tensor, axis: int, ms: Sequence[int] = INFERRED_MS) -> dict[int, int]:
    """The most non-zeros in any group of M along ``axis``, for every M in ``ms`` that divides that dimension."""
    out: dict[int, int] = {}
    if values.dim() == 0:
        return out
    for m in ms:
        if values.shape[axis % values.dim()] % m == 0 and values.numel():
            out[m] = int(group_counts(values, m, axis).max())
    return out


@dataclass(frozen=True)
class ZeroPattern:
    """What an input's stored zeros say: per M, the most non-zeros in a group and the layers checked."""

    densest: dict[int, int]
    layers: dict[int, int]

    def pattern(self) -> Pattern | None:
        """The sparsest N:M that every checked layer already satisfies, or None.

        Lowest density N/M first; among equals the M that covers more layers, then 2:4 (the
        pattern tensor cores run), then the smaller M (so a 2:4 model is 2:4, not 4:8). Ms under
        which no layer qualifies are not considered.
        """
        found = [
            (n / m, -self.layers[m], Pattern(max(n, 1), m) != TENSOR_CORE_PATTERN, m, Pattern(max(n, 1), m))
            for m, n in self.densest.items()
            if self.layers.get(m) and n < m
        ]
        return min(found)[4] if found else None


def zero_pattern(
    candidates: Callable[[Pattern], Sequence[LayerCandidate]],
    fetch: Callable[[str], torch.Tensor],
    ms: Sequence[int] = INFERRED_MS,
) -> ZeroPattern:
    """Scan the layers ``candidates(Pattern(1, M))`` deems eligible, for each M in ``ms``, reading each weight once.

    ``fetch(param)`` returns a weight. :meth:`ZeroPattern.pattern` then names the pattern the
    stored zeros satisfy (effective-weight checkpoints), if any.
    """
    by_m = {m: [c for c in candidates(Pattern(1, m)) if c.eligible] for m in ms}
    axes: dict[str, int] = {}
    wanted: dict[str, list[int]] = {}
    for m, layers in by_m.items():
        for c in layers:
            axes[c.param] = c.axis
            wanted.setdefault(c.param, []).append(m)
    densest: dict[int, int] = {}
    for param, param_ms in wanted.items():
        for m, n in most_nonzeros(fetch(param).detach(), axes[param], param_ms).items():
            densest[m] = max(densest.get(m, 0), n)
    return ZeroPattern(densest, {m: len(layers) for m, layers in by_m.items()})

"""torch's 2:4 semi-structured kernels: which exist on a GPU, which Linear layers take them, the swap.

The rules, read from torch 2.13's ``torch/sparse/semi_structured.py`` and its CUDA sources:

* **cuSPARSELt** (``SparseSemiStructuredTensorCUSPARSELT``) runs on compute capability 8.0 and later
  (Ampere, Ada, Hopper, Blackwell) when torch was built with it (``torch.backends.cusparselt``).
  Its matmul takes an ``alg_id``; ``torch._cslt_sparse_mm_search`` times the algorithms for one
  problem shape and returns the fastest, which :func:`to_semi_structured` uses.
* **CUTLASS** (``SparseSemiStructuredTensorCUTLASS``) runs on compute capability **8.x only**: its
  kernels (``_sparse_semi_structured_mm``/``addmm``) check for SM8x, so on an H100 (9.0) it fails,
  and only at the first matmul, not when the weight is converted.

So a weight is converted and then *probed* (one matmul on a random input of the shape the layer
really sees, compared with the dense kernel) before it replaces the dense one, layer by layer:
a layer whose kernels all fail keeps its dense weight and is listed, the others stay sparse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nmcli.bench.device import capability
from nmcli.device import cuda_index
from nmcli.inputs import FLOAT_PRECISIONS
from nmcli.nm.masks import is_compliant
from nmcli.nm.pattern import TENSOR_CORE_PATTERN

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)
CUTLASS_MAJOR = 8
KERNEL_NAMES = {"cusparselt": "cuSPARSELt", "cutlass": "CUTLASS"}
DEFAULT_PROBE_ROWS = 64
# max_abs_diff <= atol + rtol * max|reference|, sparse kernel vs dense kernel at the same precision
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (1e-1, 5e-2)}


def semi_structured_backends(
    capability: tuple[int, int], *, cusparselt_available: bool, force_cutlass: bool = False
) -> list[str]:
    """The 2:4 kernels that can run on a GPU of ``capability``, in the order to try them (a pure rule).

    cuSPARSELt on 8.0 and later when torch has it (unless ``force_cutlass``); CUTLASS on 8.x only.
    """
    if tuple(capability) < MIN_CAPABILITY:
        return []
    order: list[str] = []
    if cusparselt_available and not force_cutlass:
        order.append("cusparselt")
    if capability[0] == CUTLASS_MAJOR:
        order.append("cutlass")
    return order


def no_backend_reason(
    capability: tuple[int, int], *, cusparselt_available: bool, force_cutlass: bool = False, gpu: str = "the GPU"
) -> str | None:
    """Why :func:`semi_structured_backends` is empty for this GPU, or None when a kernel exists."""
    if semi_structured_backends(capability, cusparselt_available=cusparselt_available, force_cutlass=force_cutlass):
        return None
    cc = f"{capability[0]}.{capability[1]}"
    if tuple(capability) < MIN_CAPABILITY:
        return f"{gpu} has compute capability {cc}: 2:4 sparse tensor cores need 8.0 or later (Ampere)"
    if force_cutlass:
        return f"CUTLASS 2:4 kernels run on compute capability 8.x only, and {gpu} is {cc}: use cuSPARSELt"
    return (
        f"{gpu} has compute capability {cc}, where torch's CUTLASS 2:4 kernels do not run (8.x only), and this "
        f"torch ({torch.__version__}) has no cuSPARSELt: install a CUDA build of torch with cuSPARSELt"
    )


def device_backends(device: str, *, force_cutlass: bool = False) -> list[str]:
    """:func:`semi_structured_backends` for a resolved device (``cpu`` or ``cuda:N``)."""

    if not device.startswith("cuda"):
        return []
    return semi_structured_backends(
        capability(device), cusparselt_available=torch.backends.cusparselt.is_available(), force_cutlass=force_cutlass
    )


def precision_name(dtype: torch.dtype) -> str:
    """``fp16``/``bf16``/``fp32`` for a float dtype."""

    return next((k for k, v in FLOAT_PRECISIONS.items() if v == dtype), str(dtype).removeprefix("torch."))


def semi_structured_support(device: str, dtype: torch.dtype) -> str | None:
    """Why torch's 2:4 semi-structured kernels cannot run on ``device`` in ``dtype``, or None when they can."""
    if not device.startswith("cuda"):
        return (
            f"the device is {device}: torch's 2:4 semi-structured kernels need an NVIDIA GPU with compute "
            "capability >= 8.0 (Ampere or later)"
        )

    reason = no_backend_reason(
        capability(device),
        cusparselt_available=torch.backends.cusparselt.is_available(),
        gpu=torch.cuda.get_device_name(cuda_index(device)),
    )
    if reason is not None:
        return reason
    if dtype not in SEMI_STRUCTURED_DTYPES:
        return f"precision is {precision_name(dtype)}: torch's 2:4 semi-structured kernels need fp16 or bf16 (--precision fp16)"
    return None


def tolerance(dtype: torch.dtype, reference_max_abs: float) -> float:
    """The largest acceptable max abs difference of a sparse kernel against dense kernels."""
    atol, rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    return atol + rtol * reference_max_abs


def _kernel_class(backend: str) -> Any:
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    return {"cusparselt": SparseSemiStructuredTensorCUSPARSELT, "cutlass": SparseSemiStructuredTensorCUTLASS}[backend]


def _mha_children(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            names.update(f"{name}.{child}" if name else child for child, _ in module.named_modules() if child)
    return names


def default_backends() -> list[str]:
    """Both kernels when this torch has cuSPARSELt, else CUTLASS: the shape rules :func:`swap_plan` checks by default."""
    return ["cusparselt", "cutlass"] if torch.backends.cusparselt.is_available() else ["cutlass"]


def swap_plan(model: nn.Module, backends: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The Linear layers whose weight could take semi-structured kernels, and why each other one cannot.

    The weight must be 2-D fp16/bf16, 2:4 along its input dimension, and a multiple of the minimum
    tile of at least one of ``backends`` (cuSPARSELt: 16x16 fp16/bf16; CUTLASS: 32x64).
    """
    kernels = list(backends) if backends else default_backends()
    inside_mha = _mha_children(model)
    eligible: list[str] = []
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        if name in inside_mha:
            skipped[name] = "inside nn.MultiheadAttention, which calls its projections itself"
        elif weight.dtype not in SEMI_STRUCTURED_DTYPES:
            skipped[name] = f"dtype {weight.dtype}: kernels need fp16/bf16"
        elif not is_compliant(weight.detach().ne(0), TENSOR_CORE_PATTERN, axis=1):  # -0.0 is a zero to the kernels
            skipped[name] = "weight is not 2:4 along its input dimension"
        else:
            rows, cols = weight.shape
            rules = []
            for backend in kernels:
                limits = _kernel_class(backend)._DTYPE_SHAPE_CONSTRAINTS[weight.dtype]
                r, c = limits.sparse_min_rows, limits.sparse_min_cols
                if rows >= r and cols >= c and not rows % r and not cols % c:
                    break
                rules.append(f"{KERNEL_NAMES[backend]} needs multiples of {r}x{c}")
            else:
                skipped[name] = f"shape {rows}x{cols}: {', '.join(rules)}"
                continue
            eligible.append(name)
    return eligible, skipped


def _padded(probe: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    m, k = probe.shape
    pad_m, pad_k = (-m) % rows, (-k) % cols
    return torch.nn.functional.pad(probe, (0, pad_k, 0, pad_m)) if pad_m or pad_k else probe


def search_alg_id(weight: torch.Tensor, probe: torch.Tensor, bias: torch.Tensor | None = None) -> int:
    """cuSPARSELt's fastest algorithm for ``F.linear(probe, weight, bias)`` (``torch._cslt_sparse_mm_search``).

    The dense operand is laid out as torch's ``cusparselt_mm`` op lays it out for a linear layer:
    the input padded to the dense tile, transposed.
    """
    cls = _kernel_class("cusparselt")
    limits = cls._DTYPE_SHAPE_CONSTRAINTS[weight.dtype]
    packed = torch._cslt_compress(weight)
    dense = _padded(probe, limits.dense_min_rows, limits.dense_min_cols).t()
    fuse = bool(torch.sparse.SparseSemiStructuredTensor._FUSE_TRANSPOSE)
    return int(torch._cslt_sparse_mm_search(packed, dense, bias=bias, transpose_result=fuse))


def convert_weight(
    weight: torch.Tensor,
    backend: str,
    *,
    probe: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    search: bool = True,
) -> tuple[torch.Tensor, int | None, str | None]:
    """``weight`` as a semi-structured tensor of ``backend``, with cuSPARSELt's algorithm searched on ``probe``.

    Returns:
        ``(sparse_weight, alg_id, note)``: ``alg_id`` is None for CUTLASS; ``note`` says why the search
        was not used, when it was not.
    """
    cls = _kernel_class(backend)
    weight = weight.detach().contiguous()
    if backend != "cusparselt":
        return cls.from_dense(weight), None, None
    alg_id, note = 0, None
    if search and probe is not None:
        try:
            alg_id = search_alg_id(weight, probe, bias)
        except Exception as exc:  # noqa: BLE001 - the search is an optimization: alg 0 is always valid
            note = f"cuSPARSELt algorithm search failed ({type(exc).__name__}: {str(exc).splitlines()[0]}): alg_id 0"
    return cls.from_dense(weight, alg_id=alg_id), alg_id, note


def probe_kernel(
    sparse_weight: torch.Tensor, dense_weight: torch.Tensor, probe: torch.Tensor, bias: torch.Tensor | None
) -> float:
    """Run one sparse matmul and its dense twin; the max abs difference (raises if the kernel cannot run).

    Raises:
        RuntimeError: the kernel failed, or its result is off by more than :func:`tolerance`.
    """
    import torch.nn.functional as F

    with torch.inference_mode():
        want = F.linear(probe, dense_weight, bias).float()
        got = F.linear(probe, sparse_weight, bias).float()
        torch.cuda.synchronize(probe.device)
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    limit = tolerance(dense_weight.dtype, float(want.abs().max()) if want.numel() else 0.0)
    if not diff <= limit:  # NaN fails too
        raise RuntimeError(f"outputs differ from the dense kernel by {diff:.3g} (tolerance {limit:.3g})")
    return diff


@dataclass
class SwapReport:
    """Which Linear layers got semi-structured weights (and with which kernel), and why the others did not.

    Attributes:
        swapped: layers now running a 2:4 kernel, in model order.
        kernels: layer -> ``cusparselt`` or ``cutlass``.
        alg_ids: layer -> the cuSPARSELt algorithm (searched for the layer's largest input).
        skipped: layers that cannot take a 2:4 kernel, with the reason.
        failed: eligible layers whose every kernel failed here (they keep dense weights), with the errors.
        notes: anything else worth saying (a failed algorithm search).
    """

    swapped: list[str] = field(default_factory=list)
    kernels: dict[str, str] = field(default_factory=dict)
    alg_ids: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def backend(self) -> str | None:
        """``cusparselt``, ``cutlass``, ``cusparselt+cutlass`` (a mix) or None (nothing swapped)."""
        used = [k for k in ("cusparselt", "cutlass") if k in self.kernels.values()]
        return "+".join(used) or None

    @property
    def dense_layers(self) -> dict[str, str]:
        """Every Linear that still runs a dense kernel, with why."""
        return {**self.skipped, **{k: f"2:4 kernels failed here: {v}" for k, v in self.failed.items()}}


def to_semi_structured(
    model: nn.Module,
    *,
    backends: Sequence[str],
    probe_rows: Mapping[str, int] | None = None,
    search: bool = True,
) -> SwapReport:
    """Replace eligible Linear weights by semi-structured tensors, in place, layer by layer.

    For each layer of :func:`swap_plan`, each kernel of ``backends`` is tried in order: the weight is
    converted (cuSPARSELt's algorithm searched), one matmul is run on a random input of
    ``probe_rows[layer]`` rows (the largest the layer saw; default 64) and compared with the dense
    kernel, and only then does the sparse weight replace the dense one. The dense weight is freed as
    each layer is swapped, so the model is never held twice on the GPU.

    Args:
        model: a model on a CUDA device, in fp16 or bf16, with the current device set to its device.
        backends: kernels to try, e.g. from :func:`semi_structured_backends`.
        probe_rows: layer -> rows of its 2-D input to probe and search with.
        search: run cuSPARSELt's algorithm search (else ``alg_id`` 0).
    """
    eligible, skipped = swap_plan(model, backends)
    report = SwapReport(skipped=skipped)
    modules = dict(model.named_modules())
    generator: torch.Generator | None = None
    for name in eligible:
        linear = modules[name]
        assert isinstance(linear, nn.Linear)
        weight = linear.weight.detach()
        bias = linear.bias.detach() if linear.bias is not None else None
        if generator is None:
            generator = torch.Generator(device=weight.device).manual_seed(0)
        rows = max(1, int((probe_rows or {}).get(name, DEFAULT_PROBE_ROWS)))
        probe = torch.randn(rows, weight.shape[1], device=weight.device, dtype=weight.dtype, generator=generator)
        errors: list[str] = []
        for backend in backends:
            try:
                sparse_weight, alg_id, note = convert_weight(weight, backend, probe=probe, bias=bias, search=search)
                probe_kernel(sparse_weight, weight, probe, bias)
            except Exception as exc:  # noqa: BLE001 - a kernel that cannot run here: try the next, then dense
                first = str(exc).splitlines()[0] if str(exc) else ""
                errors.append(f"{KERNEL_NAMES[backend]}: {type(exc).__name__}: {first}")
                continue
            linear.weight = nn.Parameter(sparse_weight, requires_grad=False)
            report.swapped.append(name)
            report.kernels[name] = backend
            if alg_id is not None:
                report.alg_ids[name] = alg_id
            if note and note not in report.notes:
                report.notes.append(note)
            break
        else:
            report.failed[name] = "; ".join(errors) or "no 2:4 kernel runs on this GPU"
        del probe, weight
    return report


__all__ = [
    "MIN_CAPABILITY",
    "SEMI_STRUCTURED_DTYPES",
    "TOLERANCES",
    "SwapReport",
    "convert_weight",
    "device_backends",
    "no_backend_reason",
    "precision_name",
    "probe_kernel",
    "search_alg_id",
    "semi_structured_backends",
    "semi_structured_support",
    "swap_plan",
    "to_semi_structured",
    "tolerance",
]

"""The types every ``bench`` module shares, below both :mod:`nmcli.commands.bench` and the backends.

A backend module (``torch_backend``, ``onnxruntime_backend``, ``tensorrt_backend``) turns a
:class:`PlanRequest` into a :class:`BenchPlan` of :class:`Variant` objects; :mod:`nmcli.commands.bench`
times them and builds the :class:`BenchReport`. Nothing here imports a backend or ``run``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nmcli.bench.timing import LatencyStats
from nmcli.errors import InputError
from nmcli.inputs import InputSpec, InputTensor, parse_input_spec


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked ``bench`` for, handed to a backend's ``plan()``.

    Attributes:
        target: the checkpoint, model source, ``.onnx`` file or engine.
        vs: a second file of the same kind to compare against, or None.
        device: ``cpu``, ``cuda`` or ``cuda:N`` as given (None: the backend's default).
        batch_sizes: parsed ``--batch-size`` (None: the input spec's batch).
        input_shape: ``--input-shape`` as given.
        precision: ``--precision`` as given.
        compile: ``--compile``.
        arch: ``--arch``.
        trust: ``--trust``.
        model_class: ``--model-class`` (the torch backend's ``hf:`` sources).
    """

    target: str
    vs: str | None = None
    device: str | None = None
    batch_sizes: Sequence[int] | None = None
    input_shape: str | None = None
    precision: str | None = None
    compile: bool = False
    arch: str | None = None
    trust: bool = False
    model_class: str = "auto"


class Variant:
    """One thing to time: a model (or file) loaded on a device, run at several batch sizes.

    Subclasses implement :meth:`open`, :meth:`step`, :meth:`outputs` and :meth:`close`.

    Attributes:
        name: ``dense``, ``sparse``, ``model``, ``target`` or ``vs``.
        sparse: whether its weights are N:M sparse (``None``: unknown).
        sparse_kernel: whether a sparse kernel runs (``None``: unknown, e.g. a TensorRT engine).
        timer: ``cpu`` or ``cuda``, the clock :func:`~nmcli.bench.timing.measure` uses.
        stream: the CUDA stream (a ``torch.cuda.Stream``) the step's work is queued on, when it is not
            the current one; the timer records its events on it.
        notes: plain statements about how it ran (shown under the table and in the JSON).
        info: extra JSON facts (layers swapped to sparse kernels, the file, the precision).
    """

    name: str = "model"
    sparse: bool | None = None
    sparse_kernel: bool | None = False
    timer: str = "cpu"
    stream: Any = None

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.info: dict[str, Any] = {}

    def open(self, batch_sizes: Sequence[int]) -> None:
        """Load onto the device (called once, before the first batch size)."""

    def step(self, batch_size: int) -> Callable[[], Any]:
        """Build inputs for ``batch_size`` and return one inference call."""
        raise NotImplementedError

    def outputs(self, batch_size: int) -> list[torch.Tensor]:
        """The outputs of one call at ``batch_size`` (float32, CPU), on the same inputs as :meth:`step`."""
        raise NotImplementedError

    def reference(self, batch_size: int) -> list[torch.Tensor] | None:
        """Outputs of the same weights run with dense kernels, to check a sparse kernel; None if no check."""
        return None

    def tolerance(self, reference: Sequence[torch.Tensor]) -> float:
        """The largest acceptable ``max_abs_diff`` against :meth:`reference`."""
        return 0.0

    def close(self) -> None:
        """Free the device memory this variant holds."""


@dataclass
class BenchPlan:
    """What a backend hands to :func:`nmcli.commands.bench.run_bench`.

    ``device`` is resolved: ``cpu`` or ``cuda:N``, never a bare ``cuda``.
    """

    backend: str
    device: str
    precision: str
    input_spec: str | None
    variants: list[Variant]
    batch_sizes: list[int]
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class VariantResult:
    """One row of the results table."""

    variant: str
    batch_size: int
    stats: LatencyStats
    throughput: float
    peak_memory_mb: float | None
    sparse_kernel: bool | None
    timer: str

    def to_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "batch_size": self.batch_size,
            "latency_ms": self.stats.to_json(),
            "throughput": self.throughput,
            "peak_memory_mb": self.peak_memory_mb,
            "sparse_kernel": self.sparse_kernel,
            "iterations": self.stats.count,
            "timer": self.timer,
        }


@dataclass
class BenchReport:
    """Everything ``bench`` measured, with :meth:`to_json` giving the ``--json`` object."""

    target: str
    vs: str | None
    plan: BenchPlan
    environment: dict[str, Any]
    results: list[VariantResult]
    speedup: list[dict[str, Any]]
    agreement: list[dict[str, Any]]
    output: Path | None = None

    @property
    def sparse_kernel(self) -> bool | None:
        """Whether any variant ran a sparse kernel (None when unknown)."""
        flags = [v.sparse_kernel for v in self.plan.variants]
        if any(f is True for f in flags):
            return True
        return None if any(f is None for f in flags) else False

    @property
    def agreement_ok(self) -> bool:
        """False when a sparse kernel's outputs differ from the dense-kernel reference beyond tolerance."""
        return all(a.get("ok", True) is not False for a in self.agreement)

    @property
    def notes(self) -> list[str]:
        seen: list[str] = []
        for note in [*self.plan.notes, *(n for v in self.plan.variants for n in v.notes)]:
            if note not in seen:
                seen.append(note)
        return seen

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "vs": self.vs,
            "backend": self.plan.backend,
            "device": self.plan.device,
            "precision": self.plan.precision,
            "input_spec": self.plan.input_spec,
            "sparse_kernel": self.sparse_kernel,
            "environment": self.environment,
            "variants": [
                {"variant": v.name, "sparse": v.sparse, "sparse_kernel": v.sparse_kernel, "notes": v.notes, **v.info}
                for v in self.plan.variants
            ],
            "results": [r.to_json() for r in self.results],
            "speedup": self.speedup,
            "agreement": self.agreement,
            "agreement_ok": self.agreement_ok,
            "notes": self.notes,
            "output": str(self.output) if self.output else None,
        }


def flatten_outputs(obj: Any) -> list[torch.Tensor]:
    """Every floating-point tensor in a model's output (tensors, tuples, lists, dicts, ModelOutputs)."""
    found: list[torch.Tensor] = []
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            found.append(obj.detach().float().cpu())
    elif isinstance(obj, Mapping):
        for value in obj.values():
            found.extend(flatten_outputs(value))
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            found.extend(flatten_outputs(value))
    return found


def max_abs_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float | None:
    """The largest ``|a - b|`` over paired outputs (NaN-aware: a NaN in either gives ``inf``); None if they do not pair up."""
    if len(a) != len(b) or not a:
        return None
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            return None
        if x.numel() == 0:
            continue
        diff = (x.float() - y.float()).abs()
        if bool(torch.isnan(diff).any()):
            return float("inf")
        worst = max(worst, float(diff.max()))
    return worst


def spec_from_signature(
    signature: Sequence[tuple[str, Sequence[int | None], torch.dtype]],
    input_shape: str | None,
    batch_sizes: Sequence[int] | None,
) -> tuple[InputSpec, list[int]]:
    """The input spec of a file's inputs ``(name, dims, dtype)`` (``None`` dims are dynamic) and the batch sizes.

    ``--input-shape`` wins (an unnamed shape fits a single input); otherwise the file's own
    shapes are used with a dynamic leading dimension taken as the batch.

    Raises:
        InputError: dynamic dimensions other than the batch without ``--input-shape``, names that do
            not match the file's, or a fixed batch dimension asked to change.
    """
    names = [name for name, _, _ in signature]
    dtypes = {name: dtype for name, _, dtype in signature}
    leads = {int(dims[0]) for _, dims, _ in signature if dims and isinstance(dims[0], int) and dims[0] > 0}
    fixed_batch: int | None = leads.pop() if len(leads) == 1 else None  # stored or given shapes cannot change it
    if input_shape:
        given = parse_input_spec(input_shape)
        if not given.named and len(given.tensors) == len(names) == 1:
            tensors = [InputTensor(names[0], given.tensors[0].shape, dtypes[names[0]])]
        else:
            by_name = {t.name: t for t in given.tensors}
            missing = [n for n in names if n not in by_name]
            if missing:
                raise InputError(
                    f"--input-shape does not name the file's inputs {', '.join(missing)}: "
                    f"write {','.join(f'{n}:1x...:TYPE' for n in names)}"
                )
            tensors = [InputTensor(n, by_name[n].shape, dtypes[n]) for n in names]
    else:
        tensors = []
        for name, dims, dtype in signature:
            if not dims:
                raise InputError(f"input {name!r} is a scalar: pass --input-shape")
            if any(d is None for d in dims[1:]):
                shown = "x".join("?" if d is None else str(d) for d in dims)
                raise InputError(f"input {name!r} has dynamic dimensions {shown}: pass --input-shape")
            lead = dims[0]
            if lead is not None:
                fixed_batch = lead
            tensors.append(InputTensor(name, (lead or 1, *(int(d or 1) for d in dims[1:])), dtype))
    spec = InputSpec(tuple(tensors))
    sizes = list(batch_sizes) if batch_sizes else [spec.batch_size]
    if fixed_batch is not None and any(bs != fixed_batch for bs in sizes):
        raise InputError(
            f"the file's batch dimension is fixed at {fixed_batch} (exported without --dynamic-batch): re-export "
            f"it with nmcli export CHECKPOINT --dynamic-batch to bench batch sizes {','.join(map(str, sizes))}"
        )
    return spec, sizes


__all__ = [
    "BenchPlan",
    "BenchReport",
    "PlanRequest",
    "Variant",
    "VariantResult",
    "flatten_outputs",
    "max_abs_diff",
    "spec_from_signature",
]

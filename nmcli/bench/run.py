"""``nmcli bench``: pick the backend for a target, run every variant at every batch size, report.

Each backend module turns a target into a :class:`BenchPlan`: the variants to time (``dense`` and
``sparse`` for a checkpoint; the file as given, and ``--vs`` a second one, for ONNX and engines).
This module runs them through the one timing helper (:func:`nmcli.bench.timing.measure`),
checks that outputs agree, and computes the speed-ups.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nmcli.bench.timing import DEFAULT_ITERS, DEFAULT_WARMUP, LatencyStats, check_settings, environment, measure
from nmcli.bench.timing import throughput as samples_per_second
from nmcli.errors import InputError
from nmcli.inputs import FLOAT_PRECISIONS, InputSpec, InputTensor, parse_input_spec
from nmcli.io import atomic_output, check_output_path

BACKENDS = ("torch", "onnxruntime", "tensorrt")
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
PRECISIONS = tuple(FLOAT_PRECISIONS)
MAX_BATCH = 1 << 20

ProgressCallback = Callable[..., None]


class Variant:
    """One thing to time: a model (or file) loaded on a device, run at several batch sizes.

    Subclasses implement :meth:`open`, :meth:`step`, :meth:`outputs` and :meth:`close`.

    Attributes:
        name: ``dense``, ``sparse``, ``model``, ``target`` or ``vs``.
        sparse: whether its weights are N:M sparse (``None``: unknown).
        sparse_kernel: whether a sparse kernel runs (``None``: unknown, e.g. a TensorRT engine).
        timer: ``cpu`` or ``cuda``, the clock :func:`~nmcli.bench.timing.measure` uses.
        notes: plain statements about how it ran (shown under the table and in the JSON).
        info: extra JSON facts (layers swapped to sparse kernels, the file, the precision).
    """

    name: str = "model"
    sparse: bool | None = None
    sparse_kernel: bool | None = False
    timer: str = "cpu"

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
    """What a backend hands to :func:`run_bench`."""

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


# --------------------------------------------------------------------------------------------
# Option parsing


def parse_batch_sizes(text: str | Sequence[int] | None) -> list[int] | None:
    """``"1,8,32"`` -> ``[1, 8, 32]`` (order kept, duplicates dropped); None stays None.

    Raises:
        InputError: a non-integer or non-positive entry.
    """
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else [str(p) for p in text]
    sizes: list[int] = []
    for part in parts:
        if not part.isdigit() or not 0 < int(part) <= MAX_BATCH:
            raise InputError(
                f"bad --batch-size entry {part!r}: give positive integers separated by commas, e.g. 1,8,32"
            )
        if int(part) not in sizes:
            sizes.append(int(part))
    if not sizes:
        raise InputError("empty --batch-size: give e.g. 1,8,32")
    return sizes


def detect_backend(target: str, backend: str | None) -> str:
    """The backend for ``target``: ``--backend`` if given (checked against the file type), else by suffix.

    Raises:
        InputError: an unknown backend, or one that cannot read this kind of target.
    """
    suffix = Path(target).suffix.lower() if not target.startswith(("hf:", "py:", "torchvision:", "timm:")) else ""
    by_suffix = "onnxruntime" if suffix in ONNX_SUFFIXES else "tensorrt" if suffix in ENGINE_SUFFIXES else "torch"
    if backend is None:
        return by_suffix
    if backend not in BACKENDS:
        raise InputError(f"unknown --backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend != by_suffix:
        wants = {
            "torch": "a checkpoint or model source",
            "onnxruntime": "an .onnx file",
            "tensorrt": "a TensorRT engine (.engine/.plan)",
        }[backend]
        hint = " (make one with nmcli export)" if backend != "torch" else ""
        raise InputError(f"--backend {backend} benchmarks {wants}, and {target} is not one{hint}")
    return backend


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
    fixed_batch: int | None = None
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
            f"the file's batch dimension is fixed at {fixed_batch}: export it with --dynamic-batch "
            "to bench other batch sizes"
        )
    return spec, sizes


# --------------------------------------------------------------------------------------------
# The run


def make_plan(
    target: str,
    *,
    backend: str | None = None,
    device: str | None = None,
    vs: str | None = None,
    batch_sizes: Sequence[int] | None = None,
    input_shape: str | None = None,
    precision: str | None = None,
    compile: bool = False,
    arch: str | None = None,
    trust: bool = False,
) -> BenchPlan:
    """Resolve the backend and build its plan (loads models, checks the device)."""
    chosen = detect_backend(target, backend)
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"unknown --precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if device is not None and device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
        raise InputError(f"unknown --device {device!r}: use cpu or cuda")
    if vs is not None and detect_backend(vs, None) != chosen:
        raise InputError(f"--vs {vs} is not the same kind of file as {target}: compare two {chosen} targets")
    if chosen == "torch":
        from nmcli.bench import torch_backend

        if vs is not None:
            raise InputError(
                "--vs compares two ONNX files or two engines; for a checkpoint, bench already times its "
                "dense model against its sparse one"
            )
        return torch_backend.plan(
            target,
            device=device,
            batch_sizes=batch_sizes,
            input_shape=input_shape,
            precision=precision,
            compile=compile,
            arch=arch,
            trust=trust,
        )
    if compile:
        raise InputError("--compile applies to the torch backend only")
    if chosen == "onnxruntime":
        from nmcli.bench import onnxruntime_backend

        return onnxruntime_backend.plan(
            target, vs=vs, device=device, batch_sizes=batch_sizes, input_shape=input_shape, precision=precision
        )
    from nmcli.bench import tensorrt_backend

    return tensorrt_backend.plan(
        target, vs=vs, device=device, batch_sizes=batch_sizes, input_shape=input_shape, precision=precision
    )


def run_bench(
    target: str,
    *,
    backend: str | None = None,
    device: str | None = None,
    vs: str | None = None,
    batch_sizes: str | Sequence[int] | None = None,
    input_shape: str | None = None,
    precision: str | None = None,
    warmup: int = DEFAULT_WARMUP,
    iters: int | None = None,
    min_time: float | None = None,
    compile: bool = False,
    arch: str | None = None,
    trust: bool = False,
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> BenchReport:
    """``nmcli bench``: time every variant of ``target`` at every batch size.

    Settings and the output path are checked before anything is loaded. Variants run one after
    another (each loaded, timed at every batch size, then freed), so a variant's peak memory is
    its own.

    Raises:
        InputError: bad options, unreadable target, inputs the model rejects.
        BackendUnavailableError: the backend's package, CUDA, or a working torch.compile is missing.
    """
    check_settings(warmup, iters, min_time)
    sizes = parse_batch_sizes(batch_sizes)
    inputs = [p for p in (target, vs) if p]
    if output is not None:
        check_output_path(output, force=force, inputs=inputs)
    plan = make_plan(
        target,
        backend=backend,
        device=device,
        vs=vs,
        batch_sizes=sizes,
        input_shape=input_shape,
        precision=precision,
        compile=compile,
        arch=arch,
        trust=trust,
    )
    settings = {
        "warmup": warmup,
        "iters": iters if iters is not None or min_time is not None else DEFAULT_ITERS,
        "min_time_s": min_time,
        "batch_sizes": plan.batch_sizes,
        "precision": plan.precision,
        "compile": compile,
        "input_spec": plan.input_spec,
        **plan.info,
    }
    env = environment(plan.device, settings)
    results: list[VariantResult] = []
    outputs: dict[tuple[str, int], list[torch.Tensor]] = {}
    agreement: list[dict[str, Any]] = []
    total = len(plan.variants) * len(plan.batch_sizes)
    done = 0
    update = progress or (lambda *a, **k: None)
    for variant in plan.variants:
        update(done, total, variant.name)
        variant.open(plan.batch_sizes)
        try:
            for bs in plan.batch_sizes:
                update(done, total, f"{variant.name} batch {bs}")
                fn = variant.step(bs)
                measured = measure(fn, warmup=warmup, iters=iters, min_time=min_time, device=variant.timer)
                del fn
                outs = variant.outputs(bs)
                outputs[(variant.name, bs)] = outs
                ref = variant.reference(bs)
                if ref is not None:
                    diff = max_abs_diff(outs, ref)
                    tol = variant.tolerance(ref)
                    agreement.append(
                        {
                            "variant": variant.name,
                            "batch_size": bs,
                            "reference": "the same masked weights run with dense kernels",
                            "max_abs_diff": diff,
                            "tolerance": tol,
                            "ok": diff is not None and diff <= tol,
                        }
                    )
                results.append(
                    VariantResult(
                        variant.name,
                        bs,
                        measured.stats,
                        samples_per_second(bs, measured.stats.mean),
                        measured.peak_memory_mb,
                        variant.sparse_kernel,
                        measured.timer,
                    )
                )
                done += 1
                update(done, total, f"{variant.name} batch {bs}")
        finally:
            variant.close()
            gc.collect()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
    speedup = _speedups(plan, results, outputs, agreement)
    load, cores = env.get("load_average"), env.get("cpu_affinity") or env.get("cpu_count")
    if load and cores and load[0] > cores:
        plan.notes.append(
            f"the machine was busy (1-minute load {load[0]} on {cores} usable cores): CPU-side timings are noisy; "
            "compare percentiles, not single runs"
        )
    report = BenchReport(target, vs, plan, env, results, speedup, agreement)
    if output is not None:
        with atomic_output(output, force=force, inputs=inputs) as tmp:
            report.output = Path(output)
            tmp.write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n", encoding="utf-8")
    return report


def _speedups(
    plan: BenchPlan,
    results: list[VariantResult],
    outputs: Mapping[tuple[str, int], list[torch.Tensor]],
    agreement: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    names = [v.name for v in plan.variants]
    if len(names) < 2:
        return []
    if "dense" in names and "sparse" in names:
        base, other = "dense", "sparse"
    else:
        base, other = names[1], names[0]  # target vs OTHER: OTHER is the baseline
    by_key = {(r.variant, r.batch_size): r for r in results}
    checks = {(a["variant"], a["batch_size"]): a for a in agreement}
    rows: list[dict[str, Any]] = []
    for bs in plan.batch_sizes:
        a, b = by_key.get((base, bs)), by_key.get((other, bs))
        if a is None or b is None:
            continue
        ratio = a.stats.p50 / b.stats.p50 if b.stats.p50 > 0 else None
        row: dict[str, Any] = {
            "batch_size": bs,
            "baseline": base,
            "variant": other,
            f"{other}_over_{base}": ratio,
            "sparse_over_dense": ratio if (base, other) == ("dense", "sparse") else None,
            "statistic": "p50",
            "outputs_max_abs_diff": max_abs_diff(outputs.get((base, bs), []), outputs.get((other, bs), [])),
        }
        check = checks.get((other, bs))
        if check is not None:
            row["max_abs_diff"] = check["max_abs_diff"]
            row["outputs_agree"] = check["ok"]
        rows.append(row)
    return rows


__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "BenchPlan",
    "BenchReport",
    "Variant",
    "VariantResult",
    "detect_backend",
    "flatten_outputs",
    "make_plan",
    "max_abs_diff",
    "parse_batch_sizes",
    "run_bench",
    "spec_from_signature",
]

"""``nmcli bench``: pick the backend for a target, run every variant at every batch size, report.

Each backend module (listed once, in :data:`REGISTRY`) turns a :class:`~nmcli.bench.types.PlanRequest`
into a :class:`~nmcli.bench.types.BenchPlan`: the variants to time (``dense`` and ``sparse`` for a
checkpoint; the file as given, and ``--vs`` a second one, for ONNX and engines). This module runs
them through the one timing helper (:func:`nmcli.bench.timing.measure`) with the plan's device
current (:func:`nmcli.bench.device.device_guard`), checks that outputs agree, and computes the
speed-ups. The shared types live in :mod:`nmcli.bench.types`, below both this module and the backends.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from nmcli.bench.device import device_guard
from nmcli.bench.timing import DEFAULT_ITERS, DEFAULT_WARMUP, check_settings, environment, measure, ratio_interval
from nmcli.bench.timing import throughput as samples_per_second
from nmcli.bench.types import (
    BenchPlan,
    BenchReport,
    PlanRequest,
    VariantResult,
    max_abs_diff,
)
from nmcli.device import parse_device
from nmcli.errors import InputError
from nmcli.formats.open import Form, named_form
from nmcli.inputs import FLOAT_PRECISIONS
from nmcli.io import atomic_output, check_output_path
from nmcli.progress import ProgressCallback

PRECISIONS = tuple(FLOAT_PRECISIONS)
MAX_BATCH = 1 << 20


@dataclass(frozen=True)
class Backend:
    """One row of the backend table.

    Attributes:
        name: ``--backend`` value.
        module: the module with ``is_available()`` and ``plan(request) -> BenchPlan``, imported when used.
        forms: the kinds of target it reads, by their name (:func:`nmcli.formats.open.named_form`;
            empty: anything else, i.e. checkpoints and model sources).
        reads: what it benchmarks, for messages.
        compile: whether ``--compile`` applies.
    """

    name: str
    module: str
    forms: tuple[Form, ...]
    reads: str
    compile: bool = False


REGISTRY: tuple[Backend, ...] = (
    Backend("torch", "nmcli.bench.torch_backend", (), "a checkpoint or model source", compile=True),
    Backend("onnxruntime", "nmcli.bench.onnxruntime_backend", (Form.ONNX,), "an .onnx file"),
    Backend("tensorrt", "nmcli.bench.tensorrt_backend", (Form.ENGINE,), "a TensorRT engine (.engine/.plan)"),
)
BACKENDS = tuple(b.name for b in REGISTRY)
_BY_NAME = {b.name: b for b in REGISTRY}


def backend_module(name: str) -> ModuleType:
    """The module of backend ``name`` (imported now: heavy packages load only for the backend used)."""
    return importlib.import_module(_BY_NAME[name].module)


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
    """The backend for ``target``: ``--backend`` if given (checked against the file type), else by
    what its name says (:func:`nmcli.formats.open.named_form`: a missing ``x.onnx`` is still ONNX).

    Raises:
        InputError: an unknown backend, or one that cannot read this kind of target.
    """
    named = named_form(target)
    by_name = next((b.name for b in REGISTRY if named in b.forms), None)
    by_name = by_name or next(b.name for b in REGISTRY if not b.forms)
    if backend is None:
        return by_name
    if backend not in _BY_NAME:
        raise InputError(f"unknown --backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend != by_name:
        entry = _BY_NAME[backend]
        hint = " (make one with nmcli export)" if entry.forms else ""
        raise InputError(f"--backend {backend} benchmarks {entry.reads}, and {target} is not one{hint}")
    return backend


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
    model_class: str = "auto",
) -> BenchPlan:
    """Resolve the backend and build its plan (loads models, checks the device)."""

    chosen = detect_backend(target, backend)
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"unknown --precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if device is not None:
        parse_device(device)
    if vs is not None and detect_backend(vs, None) != chosen:
        raise InputError(f"--vs {vs} is not the same kind of file as {target}: compare two {chosen} targets")
    if compile and not _BY_NAME[chosen].compile:
        raise InputError(f"--compile applies to the torch backend only, not {chosen}")
    if model_class != "auto" and _BY_NAME[chosen].forms:  # ONNX files and engines: no model is built
        raise InputError(
            f"--model-class applies to the torch backend only (a checkpoint or model source), not {chosen}: "
            "drop --model-class"
        )
    request = PlanRequest(
        target,
        vs=vs,
        device=device,
        batch_sizes=batch_sizes,
        input_shape=input_shape,
        precision=precision,
        compile=compile,
        arch=arch,
        trust=trust,
        model_class=model_class,
    )
    plan: BenchPlan = backend_module(chosen).plan(request)
    return plan


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
    model_class: str = "auto",
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
        model_class=model_class,
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
    with device_guard(plan.device):  # cuda:N current: synchronize, events, peak memory and streams act on it
        env = environment(plan.device, settings)
        results, outputs, agreement = _run_variants(plan, warmup, iters, min_time, progress)
    speedup = _speedups(plan, results, outputs, agreement)
    load, cores = env.get("load_average"), env.get("cpu_affinity") or env.get("cpu_count")
    if load and cores and load[0] > cores:
        plan.notes.append(
            f"the machine was busy (1-minute load {load[0]} on {cores} usable cores): CPU-side timings are noisy; "
            "compare percentiles, not single runs"
        )
    report = BenchReport(target, vs, plan, env, results, speedup, agreement)
    if output is not None:
        with atomic_output(output, force=force, inputs=inputs, option="--output") as tmp:
            report.output = Path(output)
            tmp.write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n", encoding="utf-8")
    return report


def _run_variants(
    plan: BenchPlan, warmup: int, iters: int | None, min_time: float | None, progress: ProgressCallback | None
) -> tuple[list[VariantResult], dict[tuple[str, int], list[torch.Tensor]], list[dict[str, Any]]]:
    """Open, time and close each variant in turn; its outputs and the checks against its reference."""
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
                clock = plan.device if variant.timer == "cuda" else "cpu"
                measured = measure(
                    fn, warmup=warmup, iters=iters, min_time=min_time, device=clock, stream=variant.stream
                )
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
    return results, outputs, agreement


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
            **_interval(a.stats.samples, b.stats.samples, b.sparse_kernel),
            "outputs_max_abs_diff": max_abs_diff(outputs.get((base, bs), []), outputs.get((other, bs), [])),
        }
        check = checks.get((other, bs))
        if check is not None:
            row["max_abs_diff"] = check["max_abs_diff"]
            row["outputs_agree"] = check["ok"]
        rows.append(row)
    return rows


def _interval(base_ms: Sequence[float], other_ms: Sequence[float], sparse_kernel: bool | None) -> dict[str, Any]:
    """The p50 ratio's 95% bootstrap interval from the per-iteration samples, and whether it excludes 1.0."""
    bounds = ratio_interval(base_ms, other_ms)
    differs = bounds is not None and (bounds[0] > 1.0 or bounds[1] < 1.0)
    return {
        "ratio_interval": list(bounds) if bounds is not None else None,
        "interval_level": 0.95,
        "differs_from_1": differs,
        "sparse_kernel": sparse_kernel,
    }

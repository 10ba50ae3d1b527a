"""The one timing helper every ``bench`` backend uses, and the environment record.

Honest timing means:

* warm-up iterations that are run and thrown away (first calls pay for allocation, autotuning,
  lazy initialisation and compilation);
* one sample per iteration: on a GPU from a pair of CUDA events around the call, recorded on the
  stream the work is queued on and read after one ``torch.cuda.synchronize()`` at the end, so the
  samples are device time and queued work is not missed; on the CPU from ``time.perf_counter_ns``
  around a call that returns its outputs;
* on ``cuda:N`` every CUDA call (synchronize, events, peak-memory reset and read) acts on device N,
  which is made current for the measurement;
* statistics computed from the samples (p50/p90/p99 by linear interpolation between closest
  ranks, the same rule as ``numpy.percentile``'s default, and the mean);
* the peak device memory: on CUDA ``torch.cuda.max_memory_allocated`` since the variant was
  loaded (weights, inputs, activations; memory that onnxruntime or TensorRT allocate outside
  torch's allocator is not seen). On the CPU no peak is reported (``None``): the process RSS
  also holds the other variants, python and the libraries, so a number would mislead.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nmcli import __version__
from nmcli.device import cuda_index
from nmcli.errors import InputError

DEFAULT_WARMUP = 10
DEFAULT_ITERS = 50
MAX_ITERS = 1_000_000


@dataclass(frozen=True)
class LatencyStats:
    """Summary statistics of latency samples, all in milliseconds."""

    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float
    std: float
    count: int
    samples: tuple[float, ...] = field(default=(), repr=False, compare=False)  # per iteration, for intervals

    def to_json(self) -> dict[str, float | int]:
        return {
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "mean": self.mean,
            "min": self.min,
            "max": self.max,
            "std": self.std,
            "count": self.count,
        }


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks.

    For sorted samples ``x[0..n-1]`` the rank is ``r = q/100 * (n - 1)`` and the result is
    ``x[floor(r)] + (r - floor(r)) * (x[ceil(r)] - x[floor(r)])`` (``numpy.percentile``'s default).

    Raises:
        ValueError: no samples, or ``q`` outside ``[0, 100]``.
    """
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside [0, 100]")
    ordered = sorted(samples)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


def summarize(samples_ms: Sequence[float]) -> LatencyStats:
    """Statistics of per-iteration latencies in milliseconds (population standard deviation).

    Raises:
        ValueError: no samples.
    """
    if not samples_ms:
        raise ValueError("no latency samples to summarize")
    n = len(samples_ms)
    mean = math.fsum(samples_ms) / n
    var = math.fsum((s - mean) ** 2 for s in samples_ms) / n
    return LatencyStats(
        p50=percentile(samples_ms, 50),
        p90=percentile(samples_ms, 90),
        p99=percentile(samples_ms, 99),
        mean=mean,
        min=min(samples_ms),
        max=max(samples_ms),
        std=math.sqrt(var),
        count=n,
        samples=tuple(samples_ms),
    )


def ratio_interval(
    base_ms: Sequence[float], other_ms: Sequence[float], *, level: float = 0.95, resamples: int = 1000
) -> tuple[float, float] | None:
    """A ``level`` interval of ``p50(base) / p50(other)`` from the per-iteration samples: a seeded
    bootstrap (each side resampled with replacement, ``resamples`` times), so a rerun on the same
    samples gives the same interval. None with fewer than 3 samples on a side.
    """
    import numpy as np

    if len(base_ms) < 3 or len(other_ms) < 3:
        return None
    rng = np.random.default_rng(0)
    base, other = np.asarray(base_ms, dtype=np.float64), np.asarray(other_ms, dtype=np.float64)
    a = np.median(base[rng.integers(0, len(base), (resamples, len(base)))], axis=1)
    b = np.median(other[rng.integers(0, len(other), (resamples, len(other)))], axis=1)
    ratios = a[b > 0] / b[b > 0]
    if not len(ratios):
        return None
    tail = 100 * (1 - level) / 2
    return float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))


def throughput(batch_size: int, latency_ms: float) -> float:
    """Samples per second at ``batch_size`` samples per call taking ``latency_ms``."""
    if latency_ms <= 0:
        return math.inf
    return batch_size * 1000.0 / latency_ms


@dataclass
class Measurement:
    """What :func:`measure` returns: raw samples, their statistics, and the peak memory."""

    samples_ms: list[float]
    stats: LatencyStats
    warmup: int
    timer: str
    peak_memory_mb: float | None = None
    notes: list[str] = field(default_factory=list)


def check_settings(warmup: int, iters: int | None, min_time: float | None) -> None:
    """Validate ``--warmup``, ``--iters`` and ``--min-time`` (one of the last two at most).

    Raises:
        InputError: negative warm-up, non-positive iterations, negative time, or both given.
    """
    if warmup < 0:
        raise InputError(f"--warmup must be 0 or more, not {warmup}")
    if iters is not None and min_time is not None:
        raise InputError("give --iters N or --min-time S, not both")
    if iters is not None and not 1 <= iters <= MAX_ITERS:
        raise InputError(f"--iters must be between 1 and {MAX_ITERS}, not {iters}")
    if min_time is not None and not (min_time >= 0 and math.isfinite(min_time)):
        raise InputError(f"--min-time must be a finite number of seconds >= 0, not {min_time}")


def measure(
    fn: Callable[[], Any],
    *,
    warmup: int = DEFAULT_WARMUP,
    iters: int | None = None,
    min_time: float | None = None,
    device: str = "cpu",
    stream: Any = None,
) -> Measurement:
    """Time ``fn()``: ``warmup`` discarded calls, then ``iters`` timed calls (or until ``min_time`` s).

    Args:
        fn: one inference step. On the CPU it must return only when its work is done; on CUDA it
            may queue work asynchronously on the current stream.
        warmup: calls run before timing starts.
        iters: timed calls (default :data:`DEFAULT_ITERS` when ``min_time`` is not given).
        min_time: keep timing until this many seconds of wall time have passed (at least one call).
        device: ``cpu`` (``perf_counter_ns``), or ``cuda:N`` / ``cuda`` (the current device): CUDA
            events, one synchronize at the end, peak memory from ``torch.cuda.max_memory_allocated``
            since the call began, all on that device.
        stream: the ``torch.cuda.Stream`` ``fn`` queues its work on, when it is not the current one
            (a TensorRT engine's own stream): the events are recorded on it.

    Raises:
        InputError: bad settings (see :func:`check_settings`).
    """
    check_settings(warmup, iters, min_time)
    if iters is None and min_time is None:
        iters = DEFAULT_ITERS
    if device.startswith("cuda"):
        return _measure_cuda(fn, warmup, iters, min_time, device, stream)
    return _measure_cpu(fn, warmup, iters, min_time)


def _keep_going(done: int, iters: int | None, min_time: float | None, started_ns: int) -> bool:
    if iters is not None:
        return done < iters
    assert min_time is not None
    return done == 0 or (done < MAX_ITERS and time.perf_counter_ns() - started_ns < min_time * 1e9)


def _measure_cpu(fn: Callable[[], Any], warmup: int, iters: int | None, min_time: float | None) -> Measurement:
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    started = time.perf_counter_ns()
    while _keep_going(len(samples), iters, min_time, started):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return Measurement(samples, summarize(samples), warmup, "perf_counter_ns")


def _measure_cuda(
    fn: Callable[[], Any], warmup: int, iters: int | None, min_time: float | None, device: str, stream: Any
) -> Measurement:
    import torch

    index = torch.cuda.current_device() if device == "cuda" else cuda_index(device)
    on_stream = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with torch.cuda.device(index), on_stream:
        torch.cuda.synchronize(index)
        torch.cuda.reset_peak_memory_stats(index)
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(index)
        events: list[tuple[Any, Any]] = []
        started = time.perf_counter_ns()
        while _keep_going(len(events), iters, min_time, started):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()  # on the current stream: ``stream`` when given
            fn()
            end.record()
            events.append((start, end))
            if min_time is not None and len(events) % 64 == 0:
                end.synchronize()  # the wall clock must see device time pass, not just queued calls
        torch.cuda.synchronize(index)
        samples = [float(start.elapsed_time(end)) for start, end in events]
        peak = torch.cuda.max_memory_allocated(index) / 2**20
    return Measurement(samples, summarize(samples), warmup, "cuda_events", peak_memory_mb=peak)


# --------------------------------------------------------------------------------------------
# Environment record


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The record stored with every result: machine, CPU/GPU, library versions, threads, settings."""
    import torch

    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    env: dict[str, Any] = {
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "load_average": load,
        "nmcli": __version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "onnxruntime": _package_version("onnxruntime") or _package_version("onnxruntime-gpu"),
        "tensorrt": _package_version("tensorrt"),
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "gpu": None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.cuda.current_device() if device == "cuda" else cuda_index(device)
        env["gpu_index"] = index
        props = torch.cuda.get_device_properties(index)
        env["gpu"] = props.name
        env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(index)))
        env["gpu_memory_mb"] = round(props.total_memory / 2**20)
        env["cudnn"] = torch.backends.cudnn.version()
        env["cusparselt"] = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
        env["cuda_driver"] = _nvidia_driver()
    env["settings"] = dict(settings or {})
    return env


def _nvidia_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as fh:
            first = fh.readline()
    except OSError:
        return None
    parts = first.split()
    return next((p for p in parts if p[:1].isdigit() and "." in p), None)


__all__ = [
    "DEFAULT_ITERS",
    "DEFAULT_WARMUP",
    "LatencyStats",
    "Measurement",
    "check_settings",
    "environment",
    "measure",
    "percentile",
    "summarize",
    "throughput",
]

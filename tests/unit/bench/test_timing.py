"""The timing helper: hand-computed statistics on known samples, and what ``measure`` calls and records."""

from __future__ import annotations

import math

import pytest

from nmcli.bench.timing import (
    DEFAULT_ITERS,
    check_settings,
    environment,
    measure,
    percentile,
    summarize,
    throughput,
)
from nmcli.errors import InputError


def test_percentiles_of_one_to_ten_by_linear_interpolation() -> None:
    samples = [float(x) for x in range(10, 0, -1)]  # unsorted on purpose: 10, 9, ..., 1
    # rank = q/100 * (n - 1) over the sorted samples 1..10
    assert percentile(samples, 50) == pytest.approx(5.5)  # rank 4.5: 5 + 0.5 * (6 - 5)
    assert percentile(samples, 90) == pytest.approx(9.1)  # rank 8.1: 9 + 0.1 * (10 - 9)
    assert percentile(samples, 99) == pytest.approx(9.91)  # rank 8.91
    assert percentile(samples, 0) == 1.0
    assert percentile(samples, 100) == 10.0


def test_summarize_known_samples() -> None:
    samples = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]
    stats = summarize(samples)
    assert stats.count == 8
    assert stats.mean == pytest.approx(5.0)
    assert stats.std == pytest.approx(2.0)  # the textbook population-std example
    assert stats.min == 2.0 and stats.max == 9.0
    assert stats.p50 == pytest.approx(4.5)  # rank 3.5 between 4 and 5
    assert stats.p90 == pytest.approx(7.6)  # rank 6.3: 7 + 0.3 * (9 - 7)
    assert stats.p99 == pytest.approx(8.86)  # rank 6.93: 7 + 0.93 * 2
    assert set(stats.to_json()) >= {"p50", "p90", "p99", "mean"}


def test_summarize_single_sample_and_outlier() -> None:
    one = summarize([3.25])
    assert (one.p50, one.p90, one.p99, one.mean, one.std) == (3.25, 3.25, 3.25, 3.25, 0.0)
    spiky = summarize([1.0] * 99 + [100.0])
    assert spiky.p50 == 1.0 and spiky.p90 == 1.0
    assert spiky.p99 == pytest.approx(1.99)  # rank 98.01: 1 + 0.01 * 99
    assert spiky.mean == pytest.approx(1.99)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_throughput_is_samples_per_second() -> None:
    assert throughput(32, 4.0) == pytest.approx(8000.0)
    assert throughput(1, 0.5) == pytest.approx(2000.0)
    assert math.isinf(throughput(1, 0.0))


def test_measure_runs_warmup_then_iters_and_keeps_every_sample() -> None:
    calls: list[int] = []
    m = measure(lambda: calls.append(1), warmup=3, iters=7)
    assert len(calls) == 10
    assert len(m.samples_ms) == 7 and m.stats.count == 7 and m.warmup == 3
    assert all(s >= 0 for s in m.samples_ms)
    assert m.timer == "perf_counter_ns"
    assert m.peak_memory_mb is None  # documented: no CPU peak


def test_measure_defaults_and_min_time() -> None:
    calls: list[int] = []
    m = measure(lambda: calls.append(1), warmup=0)
    assert m.stats.count == DEFAULT_ITERS == len(calls)
    calls.clear()
    m = measure(lambda: calls.append(1), warmup=2, min_time=0.0)
    assert m.stats.count == 1 and len(calls) == 3  # at least one timed call


@pytest.mark.parametrize(
    ("warmup", "iters", "min_time"),
    [(-1, None, None), (0, 0, None), (0, 5, 1.0), (0, None, -1.0), (0, None, float("nan"))],
)
def test_bad_settings_are_input_errors(warmup: int, iters: int | None, min_time: float | None) -> None:
    with pytest.raises(InputError):
        check_settings(warmup, iters, min_time)
    with pytest.raises(InputError):
        measure(lambda: None, warmup=warmup, iters=iters, min_time=min_time)


def test_environment_records_versions_threads_and_settings() -> None:
    env = environment("cpu", {"warmup": 1})
    for key in ("machine", "cpu", "cpu_count", "torch", "torch_threads", "onnxruntime", "tensorrt", "python", "nmcli"):
        assert key in env
    assert env["settings"] == {"warmup": 1}
    assert env["torch_threads"] >= 1
    assert env["gpu"] is None

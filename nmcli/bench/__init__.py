"""``nmcli bench``: dense vs sparse, timed honestly on torch, onnxruntime and TensorRT.

* :mod:`nmcli.bench.timing`: the one timing helper (warm-up, CUDA events or ``perf_counter_ns``,
  per-iteration samples, percentiles, peak memory) and the environment record;
* :mod:`nmcli.bench.run`: option parsing, the variant loop, output agreement and speed-ups;
* :mod:`nmcli.bench.torch_backend`, :mod:`nmcli.bench.onnxruntime_backend`,
  :mod:`nmcli.bench.tensorrt_backend`: one module per backend, each with ``is_available()``;
  heavy packages (onnxruntime, tensorrt) are imported only when that backend runs.
"""

from __future__ import annotations

from nmcli.bench.run import BenchReport, run_bench

__all__ = ["BenchReport", "run_bench"]

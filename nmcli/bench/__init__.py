"""``nmcli bench``: dense vs sparse, timed honestly on torch, onnxruntime and TensorRT.

* :mod:`nmcli.bench.types`: the shared types (``PlanRequest``, ``Variant``, ``BenchPlan``,
  ``BenchReport``) and output helpers, below both ``run`` and the backends;
* :mod:`nmcli.bench.timing`: the one timing helper (warm-up, CUDA events or ``perf_counter_ns``,
  per-iteration samples, percentiles, peak memory) and the environment record;
* :mod:`nmcli.bench.device`: the device guard and capability (``--device`` is resolved by
  :mod:`nmcli.device`, as for every command);
* :mod:`nmcli.bench.sparse_kernels`: which 2:4 kernels run on a GPU, and the per-layer swap;
* :mod:`nmcli.commands.bench` (above this package): the backend table, option parsing, the
  variant loop, output agreement and speed-ups;
* :mod:`nmcli.bench.torch_backend`, :mod:`nmcli.bench.onnxruntime_backend`,
  :mod:`nmcli.bench.tensorrt_backend`: one module per backend, each with ``is_available()`` and
  ``plan(request)``; heavy packages (onnxruntime, tensorrt) are imported only when that backend runs.
"""

"""GPU only (marker ``gpu``): 2:4 semi-structured kernels, devices and streams on real CUDA hardware.

Skipped without CUDA. Each kernel case runs only where the capability rule
(:func:`nmcli.bench.sparse_kernels.semi_structured_backends`) says it exists: cuSPARSELt on >= 8.0
when torch has it, CUTLASS on 8.x only (so the CUTLASS cases skip on an H100, where they cannot run).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from nmcli.bench.device import device_guard
from nmcli.bench.sparse_kernels import semi_structured_backends, swap_plan, to_semi_structured
from nmcli.bench.timing import measure
from nmcli.commands.bench import run_bench
from nmcli.device import resolve_device
from nmcli.nm.masks import apply_mask, nm_mask
from nmcli.nm.pattern import TENSOR_CORE_PATTERN

pytestmark = pytest.mark.gpu


def _kernels_here() -> list[str]:
    if not torch.cuda.is_available():
        return []
    return semi_structured_backends(
        torch.cuda.get_device_capability(), cusparselt_available=torch.backends.cusparselt.is_available()
    )


def _needs(kernel: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if kernel not in _kernels_here():
        major, minor = torch.cuda.get_device_capability()
        pytest.skip(f"no {kernel} 2:4 kernels on compute capability {major}.{minor} with this torch")


def _pruned_mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 10))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            assert isinstance(layer, nn.Linear)
            layer.weight.copy_(apply_mask(layer.weight, nm_mask(layer.weight, TENSOR_CORE_PATTERN, axis=1)))
    return model.eval().to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["cusparselt", "cutlass"])
def test_semi_structured_matches_masked_dense(dtype: torch.dtype, kernel: str) -> None:
    _needs(kernel)
    dense = _pruned_mlp(dtype)
    sparse = copy.deepcopy(dense)
    report = to_semi_structured(sparse, backends=[kernel], probe_rows={"0": 37, "2": 37})
    assert report.swapped == ["0", "2"] and report.failed == {}, report.failed
    assert set(report.kernels.values()) == {kernel} and "not 2:4" in report.skipped["4"]
    if kernel == "cusparselt":
        assert set(report.alg_ids) == {"0", "2"} and all(a >= 0 for a in report.alg_ids.values())
    x = torch.randn(37, 256, device="cuda", dtype=dtype)  # 37 rows: the kernel pads the dense input
    with torch.inference_mode():
        want, got = dense(x).float(), sparse(x).float()
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_cutlass_on_a_gpu_without_it_keeps_layers_dense_one_by_one() -> None:
    """Where CUTLASS cannot run (9.0+), asking for it fails per layer at the probe matmul, not later."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability()[0] == 8:
        pytest.skip("CUTLASS runs on 8.x: nothing to fall back from")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("no 2:4 tensor cores at all")
    model = _pruned_mlp(torch.float16)
    report = to_semi_structured(model, backends=["cutlass", *_kernels_here()])
    eligible, _ = swap_plan(model, ["cusparselt", "cutlass"])
    assert sorted([*report.swapped, *report.failed]) == sorted(eligible)
    if "cusparselt" in _kernels_here():
        assert report.swapped == ["0", "2"] and set(report.kernels.values()) == {"cusparselt"}
    with torch.inference_mode():
        model(torch.randn(8, 256, device="cuda", dtype=torch.float16))


def test_bench_cuda_runs_sparse_kernels_and_checks_outputs(tmp_path: Path) -> None:
    if not _kernels_here():
        pytest.skip("no 2:4 kernels on this GPU")
    from nmcli.commands.prune import run_prune
    from tests.conftest import py_source

    ckpt = tmp_path / "mlp.safetensors"
    run_prune(py_source("tiny_mlp"), input_shape="1x64", output=ckpt)
    report = run_bench(str(ckpt), device="cuda", precision="fp16", batch_sizes="8,64", warmup=1, iters=3)
    data = json.loads(json.dumps(report.to_json(), default=str))
    assert data["device"] == f"cuda:{torch.cuda.current_device()}" and data["environment"]["gpu"]
    assert all(r["peak_memory_mb"] and r["peak_memory_mb"] > 0 for r in data["results"])
    sparse = next(v for v in data["variants"] if v["variant"] == "sparse")
    if sparse["sparse_kernel"]:
        assert data["agreement"] and data["agreement_ok"], data["agreement"]
        assert sparse["semi_structured_layers"] and sparse["sparse_backend"]
    else:  # tiny_mlp's 128x64 / 64x128 layers fit both kernels: a failure to swap must be explained
        assert any(n.startswith("no sparse kernel was used") for n in sparse["notes"])


def test_measure_times_work_queued_on_a_side_stream() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.randn(2048, 2048, device="cuda")
    stream = torch.cuda.Stream()

    def step() -> None:
        with torch.cuda.stream(stream):
            for _ in range(4):
                x @ x  # the work being timed

    on_stream = measure(step, warmup=2, iters=5, device="cuda", stream=stream)
    assert on_stream.timer == "cuda_events" and on_stream.stats.p50 > 0.01  # ~4 x 17 GFLOP: not ~0


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (cuda:1)"
)
def test_cuda_1_is_measured_on_cuda_1() -> None:
    assert torch.cuda.current_device() == 0
    dev = resolve_device("cuda:1")
    with device_guard(dev):
        x = torch.randn(4096, 4096, device=dev)
        m = measure(lambda: x @ x, warmup=2, iters=5, device=dev)
    assert torch.cuda.current_device() == 0  # the guard restored it
    assert m.stats.p50 > 0.05  # a 137 GFLOP matmul timed on the device that ran it, not ~0 from cuda:0's events
    assert m.peak_memory_mb is not None and m.peak_memory_mb >= 64  # x and the result live on cuda:1


@pytest.mark.trt
def test_tensorrt_engine_bench_on_its_own_stream(tmp_path: Path) -> None:
    from nmcli.commands.export import run_export
    from nmcli.commands.prune import run_prune
    from tests.conftest import py_source

    ckpt = tmp_path / "mlp.safetensors"
    run_prune(py_source("tiny_mlp"), input_shape="8x64", output=ckpt)
    result = run_export(str(ckpt), trt=True, sparse=True, precision="fp16", dynamic_batch=True, workspace_mb=256)
    assert result.engine is not None
    report = run_bench(str(result.engine.path), batch_sizes="1,8", warmup=2, iters=5)
    data = json.loads(json.dumps(report.to_json(), default=str))
    assert data["backend"] == "tensorrt" and data["device"].startswith("cuda:")
    assert all(r["latency_ms"]["p50"] > 0 and r["timer"] == "cuda_events" for r in data["results"])
    assert any("dedicated CUDA stream" in n for n in data["notes"])
    assert not any("default stream" in n and "TensorRT (" in n for n in data["notes"])

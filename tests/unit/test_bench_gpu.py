"""GPU only (marker ``gpu``): 2:4 semi-structured kernels give the masked dense model's outputs.

Skipped without CUDA; on GPUs older than compute capability 8.0 the kernels do not exist.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from nmcli.bench.run import run_bench
from nmcli.bench.torch_backend import to_semi_structured
from nmcli.patterns import TENSOR_CORE_PATTERN, apply_mask, nm_mask

pytestmark = pytest.mark.gpu


def _needs_sm80() -> None:
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 sparse tensor cores need compute capability >= 8.0")


def _pruned_mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 10))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.copy_(apply_mask(layer.weight, nm_mask(layer.weight, TENSOR_CORE_PATTERN, axis=1)))
    return model.eval().to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("force_cutlass", [False, True])
def test_semi_structured_matches_masked_dense(dtype: torch.dtype, force_cutlass: bool) -> None:
    _needs_sm80()
    if not force_cutlass and not torch.backends.cusparselt.is_available():
        pytest.skip("this torch has no cuSPARSELt")
    dense = _pruned_mlp(dtype)
    sparse = copy.deepcopy(dense)
    try:
        report = to_semi_structured(sparse, force_cutlass=force_cutlass)
    except RuntimeError as exc:
        pytest.skip(f"{'CUTLASS' if force_cutlass else 'cuSPARSELt'} 2:4 kernels unavailable on this GPU: {exc}")
    assert report.swapped == ["0", "2"] and "not 2:4" in report.skipped["4"]
    x = torch.randn(37, 256, device="cuda", dtype=dtype)  # 37 rows: the kernel pads the dense input
    with torch.inference_mode():
        want, got = dense(x).float(), sparse(x).float()
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_bench_cuda_runs_sparse_kernels_and_checks_outputs(tmp_path: Path) -> None:
    _needs_sm80()
    from nmcli.prune import run_prune
    from tests.conftest import py_source

    ckpt = tmp_path / "mlp.safetensors"
    run_prune(py_source("tiny_mlp"), input_shape="1x64", output=ckpt)
    report = run_bench(str(ckpt), device="cuda", precision="fp16", batch_sizes="8,64", warmup=1, iters=3)
    data = json.loads(json.dumps(report.to_json(), default=str))
    assert data["device"] == "cuda" and data["environment"]["gpu"]
    assert all(r["peak_memory_mb"] and r["peak_memory_mb"] > 0 for r in data["results"])
    sparse = next(v for v in data["variants"] if v["variant"] == "sparse")
    if sparse["sparse_kernel"]:
        assert data["agreement"] and data["agreement_ok"], data["agreement"]
    else:  # tiny_mlp's 128x64 / 64x128 layers fit both kernels: a failure to swap must be explained
        assert any(n.startswith("no sparse kernel was used") for n in sparse["notes"])

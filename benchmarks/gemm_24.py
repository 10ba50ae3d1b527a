"""Single linear layers: dense cuBLAS against 2:4 semi-structured sparse kernels (cuSPARSELt/CUTLASS).

    python benchmarks/gemm_24.py                       # K=N in {1024, 4096, 8192}, M = 16..16384, fp16 and bf16
    python benchmarks/gemm_24.py --sizes 4096 --tokens 256,4096 --dtypes fp16 --json gemm.json

``y = x @ W.T`` with ``x`` of ``M x K`` tokens and ``W`` of ``N x K`` pruned 2:4 along K. The dense
side runs ``torch.nn.functional.linear`` on the masked weight (cuBLAS); the sparse side runs the
same call on the 2:4 semi-structured weight: cuSPARSELt (with the algorithm
``torch._cslt_sparse_mm_search`` finds fastest for that cell's shape) where torch has it, CUTLASS
on compute capability 8.x only (``--cutlass`` forces it; it does not run on 9.0+, and the script says
so instead of crashing). Sparse tensor cores halve the math, so 2x is the physical limit; small M is
memory-bound and usually shows less. Every cell also checks that both outputs agree (max abs diff),
so a fast-but-wrong kernel shows up; a kernel that fails on one cell is reported in that row.

Needs a CUDA GPU where a 2:4 kernel runs; without one it says why and exits with code 3.
Timing goes through nmcli's one helper (``nmcli.bench.timing.measure``: warm-up, CUDA events).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.nn.functional as F
from gpu_report import finish  # benchmarks/ is on sys.path when a script here runs

from nmcli.bench.sparse_kernels import KERNEL_NAMES, convert_weight, no_backend_reason, probe_kernel
from nmcli.bench.sparse_kernels import semi_structured_backends as kernels_for
from nmcli.bench.timing import environment, measure
from nmcli.device import resolve_device
from nmcli.nm.masks import apply_mask, nm_mask
from nmcli.nm.pattern import TENSOR_CORE_PATTERN

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def bench_cell(
    n: int, m: int, dtype: torch.dtype, warmup: int, iters: int, kernels: list[str], device: str
) -> dict[str, Any]:
    """Dense vs 2:4 sparse for one ``M x K @ (N x K).T`` with ``K = N = n``, on the first kernel that runs."""
    gen = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    weight = apply_mask(weight, nm_mask(weight, TENSOR_CORE_PATTERN, axis=1)).contiguous()
    x = torch.randn(m, n, device=device, dtype=dtype, generator=gen)
    row: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "k_n": n, "m": m}
    errors = []
    for kernel in kernels:
        try:
            sparse_weight, alg_id, note = convert_weight(weight, kernel, probe=x)
            probe_kernel(sparse_weight, weight, x, None)
        except Exception as exc:  # noqa: BLE001 - reported in the row, the next kernel is tried
            errors.append(
                f"{KERNEL_NAMES[kernel]}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
            continue
        row.update(sparse_backend=kernel, cusparselt_alg_id=alg_id, search_note=note)
        break
    else:
        row.update(sparse_backend=None, error="; ".join(errors))
        return row
    with torch.inference_mode():
        want = F.linear(x, weight).float()
        got = F.linear(x, sparse_weight).float()
        dense = measure(lambda: F.linear(x, weight), warmup=warmup, iters=iters, device=device)
        sparse = measure(lambda: F.linear(x, sparse_weight), warmup=warmup, iters=iters, device=device)
    flops = 2.0 * m * n * n
    row.update(
        dense_p50_ms=dense.stats.p50,
        sparse_p50_ms=sparse.stats.p50,
        speedup=dense.stats.p50 / sparse.stats.p50,
        dense_tflops=flops / dense.stats.p50 / 1e9,
        sparse_tflops_dense_equivalent=flops / sparse.stats.p50 / 1e9,
        max_abs_diff=float((got - want).abs().max()),
        max_abs_out=float(want.abs().max()),
    )
    return row


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and print the table (and write ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,4096,8192", help="K=N values")
    parser.add_argument("--tokens", default="16,64,256,1024,4096,16384", help="M values (tokens)")
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument(
        "--cutlass",
        action="store_true",
        help="force CUTLASS kernels instead of cuSPARSELt (compute capability 8.x only)",
    )
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (default: the current CUDA device)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            f"gemm_24.py needs a CUDA GPU with compute capability >= 8.0, and torch {torch.__version__} sees none: "
            "nothing was measured",
            file=sys.stderr,
        )
        return 3
    device = resolve_device(args.device)
    index = int(device.split(":")[1])
    torch.cuda.set_device(index)  # a script of its own: every CUDA call below acts on this device
    capability = torch.cuda.get_device_capability(index)
    cusparselt = torch.backends.cusparselt.is_available()
    kernels = kernels_for(capability, cusparselt_available=cusparselt, force_cutlass=args.cutlass)
    reason = no_backend_reason(
        capability, cusparselt_available=cusparselt, force_cutlass=args.cutlass, gpu=torch.cuda.get_device_name(index)
    )
    if reason is not None:
        print(f"{reason}: nothing was measured", file=sys.stderr)
        return 3
    rows = []
    header = f"{'dtype':<9}{'K=N':>6}{'M':>7}{'dense ms':>11}{'2:4 ms':>10}{'speed-up':>10}{'dense TF/s':>12}{'max|diff|':>11}  kernel"
    print(header)
    for dtype_name in args.dtypes.split(","):
        for n in _ints(args.sizes):
            for m in _ints(args.tokens):
                row = bench_cell(n, m, DTYPES[dtype_name], args.warmup, args.iters, kernels, device)
                rows.append(row)
                if row["sparse_backend"] is None:
                    print(f"{row['dtype']:<9}{n:>6}{m:>7}  no 2:4 kernel ran: {row['error']}", flush=True)
                    continue
                alg = f" alg {row['cusparselt_alg_id']}" if row["cusparselt_alg_id"] is not None else ""
                print(
                    f"{row['dtype']:<9}{n:>6}{m:>7}{row['dense_p50_ms']:>11.4f}{row['sparse_p50_ms']:>10.4f}"
                    f"{row['speedup']:>9.2f}x{row['dense_tflops']:>12.1f}{row['max_abs_diff']:>11.3g}  "
                    f"{row['sparse_backend']}{alg}",
                    flush=True,
                )
    env = environment(device, vars(args))
    return finish(env, rows, args.json)


if __name__ == "__main__":
    raise SystemExit(main())

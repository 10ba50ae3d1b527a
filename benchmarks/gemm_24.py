"""Single linear layers: dense cuBLAS against 2:4 semi-structured sparse kernels (cuSPARSELt/CUTLASS).

    python benchmarks/gemm_24.py                       # K=N in {1024, 4096, 8192}, M = 16..16384, fp16 and bf16
    python benchmarks/gemm_24.py --sizes 4096 --tokens 256,4096 --dtypes fp16 --json gemm.json

``y = x @ W.T`` with ``x`` of ``M x K`` tokens and ``W`` of ``N x K`` pruned 2:4 along K. The dense
side runs ``torch.nn.functional.linear`` on the masked weight (cuBLAS); the sparse side runs the
same call on ``torch.sparse.to_sparse_semi_structured(W)``. Sparse tensor cores halve the math,
so 2x is the physical limit; small M is memory-bound and usually shows less. Every cell also
checks that both outputs agree (max abs diff), so a fast-but-wrong kernel shows up.

Needs a CUDA GPU with compute capability >= 8.0; without one it says so and exits with code 3.
Timing goes through nmcli's one helper (``nmcli.bench.timing.measure``: warm-up, CUDA events).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.nn.functional as F
from gpu_report import finish  # benchmarks/ is on sys.path when a script here runs

from nmcli.bench.timing import environment, measure
from nmcli.patterns import TENSOR_CORE_PATTERN, apply_mask, nm_mask

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def bench_cell(n: int, m: int, dtype: torch.dtype, warmup: int, iters: int) -> dict[str, Any]:
    """Dense vs 2:4 sparse for one ``M x K @ (N x K).T`` with ``K = N = n``."""
    from torch.sparse import to_sparse_semi_structured

    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(n, n, device="cuda", dtype=dtype, generator=gen)
    weight = apply_mask(weight, nm_mask(weight, TENSOR_CORE_PATTERN, axis=1)).contiguous()
    x = torch.randn(m, n, device="cuda", dtype=dtype, generator=gen)
    sparse_weight = to_sparse_semi_structured(weight)
    with torch.inference_mode():
        want = F.linear(x, weight).float()
        got = F.linear(x, sparse_weight).float()
        dense = measure(lambda: F.linear(x, weight), warmup=warmup, iters=iters, device="cuda")
        sparse = measure(lambda: F.linear(x, sparse_weight), warmup=warmup, iters=iters, device="cuda")
    flops = 2.0 * m * n * n
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "k_n": n,
        "m": m,
        "dense_p50_ms": dense.stats.p50,
        "sparse_p50_ms": sparse.stats.p50,
        "speedup": dense.stats.p50 / sparse.stats.p50,
        "dense_tflops": flops / dense.stats.p50 / 1e9,
        "sparse_tflops_dense_equivalent": flops / sparse.stats.p50 / 1e9,
        "max_abs_diff": float((got - want).abs().max()),
        "max_abs_out": float(want.abs().max()),
        "sparse_backend": type(sparse_weight).__name__,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and print the table (and write ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,4096,8192", help="K=N values")
    parser.add_argument("--tokens", default="16,64,256,1024,4096,16384", help="M values (tokens)")
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--cutlass", action="store_true", help="force CUTLASS kernels instead of cuSPARSELt")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            f"gemm_24.py needs a CUDA GPU with compute capability >= 8.0, and torch {torch.__version__} sees none: "
            "nothing was measured",
            file=sys.stderr,
        )
        return 3
    if torch.cuda.get_device_capability() < (8, 0):
        print(
            f"{torch.cuda.get_device_name()} has no 2:4 sparse tensor cores (compute capability < 8.0)", file=sys.stderr
        )
        return 3
    from torch.sparse import SparseSemiStructuredTensor

    SparseSemiStructuredTensor._FORCE_CUTLASS = args.cutlass or not torch.backends.cusparselt.is_available()
    rows = []
    header = f"{'dtype':<9}{'K=N':>6}{'M':>7}{'dense ms':>11}{'2:4 ms':>10}{'speed-up':>10}{'dense TF/s':>12}{'max|diff|':>11}"
    print(header)
    for dtype_name in args.dtypes.split(","):
        for n in _ints(args.sizes):
            for m in _ints(args.tokens):
                row = bench_cell(n, m, DTYPES[dtype_name], args.warmup, args.iters)
                rows.append(row)
                print(
                    f"{row['dtype']:<9}{n:>6}{m:>7}{row['dense_p50_ms']:>11.4f}{row['sparse_p50_ms']:>10.4f}"
                    f"{row['speedup']:>9.2f}x{row['dense_tflops']:>12.1f}{row['max_abs_diff']:>11.3g}",
                    flush=True,
                )
    env = environment("cuda", vars(args))
    return finish(env, rows, args.json)


if __name__ == "__main__":
    raise SystemExit(main())

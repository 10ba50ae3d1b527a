"""Torch's intra-op thread count, set for a block of code and restored after it.

Calibrated pruning on the CPU runs each task on one intra-op thread (several tasks side by side on
:class:`nmcli.algorithms.parallel.Workers`): torch's CPU reductions (norms, softmax, means) and MKL's
products split their sums by thread, so the same input gives different low bits with 1 or 2 threads,
and SparseGPT's near-ties then fall differently from layer to layer (DESIGN.md 3b: same results
whatever the thread count). Measured on torch 2.13 / MKL 2024.2: the forwards and the large products
give the same bits on 1 or 2 threads, but small float64 products (``[32, 64] @ [64, 64]``) and
LAPACK's Cholesky factorization do not, even with MKL_CBWR=AUTO,STRICT. One OpenMP region also waits
for its slowest thread, so on a busy machine it stalls (issue 24: MiniLM's sparsegpt took 44 s on one
thread and 600 s on two at load 5 on 2 cores); independent tasks do not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads (no change when it already has them)."""
    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)

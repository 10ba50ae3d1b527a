"""Torch's intra-op thread count, set for a block of code and restored after it.

Calibrated pruning on the CPU runs on one thread: torch's CPU reductions (norms, softmax, means) and
MKL's products split their sums by thread, so the same input gives different low bits with 1 or 2
threads, and SparseGPT's near-ties then fall differently from layer to layer (DESIGN.md 3b: same
results whatever the thread count). One thread also never oversubscribes a busy machine.
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

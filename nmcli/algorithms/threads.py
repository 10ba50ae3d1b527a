"""Torch's intra-op thread count, set for a block of code and restored after it.

Calibrated pruning must give the same bits whatever the thread count (DESIGN.md 3b). Measured on
torch 2.13 with MKL 2024.2 (issue 24): the forwards, and MKL's float32/float64 products, give the
same bits with 1 or 2 threads, so they run on every thread. Two kinds of operation do not, and run
on one thread through :func:`serial`: LAPACK's Cholesky factorization and inverse (their blocked
algorithms split work by thread), and torch reductions with a single output of 32768 or more
elements (torch splits those across threads; a reduction with several outputs gives each output
to one thread).
"""

from __future__ import annotations

import contextlib
import os
import time
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


def serial(device: torch.device | str) -> contextlib.AbstractContextManager[None]:
    """One torch thread on the CPU, for the operations whose bits depend on the thread count (no change elsewhere)."""
    return torch_threads(1) if torch.device(device).type == "cpu" else contextlib.nullcontext()


def _cpu_sample() -> tuple[float, float, float] | None:
    """``(wall, this process's CPU seconds, idle core-seconds of the machine)`` now; None without /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
        idle_ticks = int(fields[4]) + int(fields[5])  # idle + iowait
    except (OSError, IndexError, ValueError):
        return None
    return time.monotonic(), time.process_time(), idle_ticks / _TICKS


_TICKS = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
_MIN_INTERVAL = 0.05  # seconds: shorter intervals are all noise


class ThreadPace:
    """Torch's thread count for a long CPU computation, re-chosen as it goes from the cores it finds free.

    OpenMP waits at the end of every parallel operation for its slowest thread: on a machine whose
    cores other processes keep busy, two threads run far slower than one (MiniLM's calibrated prune:
    44 s on one thread, 600 s on two, at load 5 on 2 cores). :meth:`adjust` (called between blocks)
    takes as many threads as the cores this process used plus the cores left idle since the last
    call, at least one and at most the thread count the pace started with. The results do not
    depend on it: every thread-dependent operation runs on one thread (:func:`serial`). Without
    ``/proc/stat`` (not Linux), the thread count stays as it is.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.ceiling = torch.get_num_threads()
        self.active = torch.device(device).type == "cpu" and self.ceiling > 1
        self._mark = _cpu_sample() if self.active else None

    def adjust(self) -> int:
        """Set and return the thread count for the next stretch of work, from the cores free since the last call."""
        now = _cpu_sample() if self.active else None
        if now is None or self._mark is None or now[0] - self._mark[0] < _MIN_INTERVAL:
            return torch.get_num_threads()
        wall = now[0] - self._mark[0]
        available = (now[1] - self._mark[1] + now[2] - self._mark[2]) / wall
        self._mark = now
        count = max(1, min(self.ceiling, int(available + 0.25)))
        torch.set_num_threads(count)
        return count

    def close(self) -> None:
        """Give torch back the thread count it had."""
        if self.active:
            torch.set_num_threads(self.ceiling)

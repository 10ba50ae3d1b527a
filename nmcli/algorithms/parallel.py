"""Calibration work on several CPU cores with results that do not depend on how many run it.

Torch's own intra-op threads split sums and products by thread, so the same input gives different
low bits with 1 or 2 threads (:mod:`nmcli.algorithms.threads`). Here the work is cut instead into
tasks fixed by the problem alone (one calibration batch, one slice of a weight's rows), each task
runs on one intra-op thread in a worker thread (torch releases the GIL inside its kernels), and the
results are taken and combined in task order. Every task computes exactly what it would compute
alone, so the result is the same, to the bit, with 1 worker or 8: only the wall time changes.
Independent tasks also never wait on one another's threads, so a busy machine slows them down
rather than stalling them (an OpenMP region waits for its slowest thread).
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

MAX_WORKERS = 8


def default_workers(threads: int) -> int:
    """Workers for a machine where torch would use ``threads`` intra-op threads (at most the CPUs this process may use)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(threads, cpus, MAX_WORKERS))


def _one_thread() -> None:
    torch.set_num_threads(1)


class Workers:
    """A pool of ``count`` threads that runs tasks and hands their results back in task order.

    ``count`` 1 runs every task in the calling thread. Use as a context manager, or :meth:`close`.
    """

    def __init__(self, count: int) -> None:
        self.count = max(1, count)
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(self.count, thread_name_prefix="nmcli-calib", initializer=_one_thread)
            if self.count > 1
            else None
        )

    def map(self, task: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """``task(item)`` for each item, yielded in the items' order, at most ``count`` running at a time
        (and one more queued).

        Tasks run without autograd (as the calibration does). Should a task raise, or the caller stop
        early, the tasks not yet started are cancelled and the running ones finish before this returns.
        """
        if self._pool is None:
            for item in items:
                yield task(item)
            return
        pending: collections.deque[concurrent.futures.Future[R]] = collections.deque()
        source = iter(items)
        try:
            for item in source:
                pending.append(self._pool.submit(_no_grad, task, item))
                if len(pending) > self.count:  # one queued beyond the running ones: no worker idles while we consume
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            concurrent.futures.wait(pending)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _no_grad(task: Callable[[T], R], item: T) -> R:
    with torch.no_grad():
        return task(item)


SERIAL = Workers(1)  # the calling thread alone: for code outside a calibrated prune

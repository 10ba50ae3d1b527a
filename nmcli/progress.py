"""Progress reporting shared by every long-running core function.

The core reports progress through a callback ``(done, total, label)``; the CLI renders it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

ProgressCallback = Callable[[int, int, str], None]


class ByteProgress:
    """``progress(MiB done, MiB total, label)`` with the throughput in the label."""

    def __init__(self, callback: ProgressCallback | None, total_bytes: int) -> None:
        self.callback, self.total, self.done, self.start = callback, total_bytes, 0, time.perf_counter()

    def advance(self, nbytes: int, label: str) -> None:
        self.done += nbytes
        if self.callback is None:
            return
        rate = self.done / max(time.perf_counter() - self.start, 1e-9) / 1e6
        self.callback(self.done >> 20, max(self.total >> 20, 1), f"{label} {rate:,.0f} MB/s")

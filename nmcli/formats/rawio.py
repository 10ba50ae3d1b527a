"""The raw I/O engine of the streamed pipelines: a read-ahead shard stream and a double-buffered
sequential writer (O_DIRECT where the filesystem allows it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

from nmcli.errors import CheckpointError

STAGE_BYTES = 32 << 20  # one staging buffer of the output writer (two of them alternate)
DIRECT_ALIGN = 4096  # O_DIRECT offsets, sizes and buffer addresses are multiples of this
STREAM_PIECE = 16 << 20  # a shard is read in pieces of this size
STREAM_RING = 8  # pieces in flight between the reading thread and the prune
READ_AHEAD = 256 << 20  # the kernel is asked to read this far ahead of the reading thread
STREAM_GROUPS = 1 << 16  # groups of m per slice of the streamed mask


class ShardStream:
    """A file read front to back by a thread into a ring of buffers and hashed on the way; the
    prune takes its bytes in order from the same buffers.

    The reading thread does the I/O (the kernel reading ahead on a ``POSIX_FADV_WILLNEED`` hint)
    and the sha256 (``hashlib`` releases the GIL), the main thread only computes: no page faults on
    a memory map (cold faults ran at ~50 MB/s here, warm ones still cost a fault per 4 KiB), no
    second read, and memory fixed at ``STREAM_RING`` pieces of ``STREAM_PIECE`` bytes.
    """

    def __init__(self, path: Path) -> None:
        import queue

        self.path = path
        self._pieces = [bytearray(STREAM_PIECE) for _ in range(STREAM_RING)]
        self._free: queue.Queue[int] = queue.Queue()
        self._full: queue.Queue[tuple[int, int] | None] = queue.Queue()
        for index in range(STREAM_RING):
            self._free.put(index)
        self._digest = hashlib.sha256()
        self._error: OSError | None = None
        self._stop = False
        self._current: tuple[int, int] | None = None  # (piece index, bytes in it) being consumed
        self._position = 0  # consumed bytes of the current piece
        self._ended = False
        self._scratch = bytearray(0)
        self._thread = threading.Thread(target=self._run, name=f"read {path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with open(self.path, "rb", buffering=0) as fh:
                offset = 0
                while True:
                    index = self._free.get()
                    if self._stop:
                        return
                    with contextlib.suppress(AttributeError, OSError):
                        os.posix_fadvise(fh.fileno(), offset, READ_AHEAD, os.POSIX_FADV_WILLNEED)
                    view = memoryview(self._pieces[index])
                    count = 0
                    while count < STREAM_PIECE:  # whole pieces: a short read is not the end of the file
                        got = fh.readinto(view[count:])
                        if not got:
                            break
                        count += got
                    if count:
                        self._digest.update(view[:count])
                        offset += count
                        self._full.put((index, count))
                    if count < STREAM_PIECE:
                        return
        except OSError as exc:  # reported to the consumer by take() and hexdigest()
            self._error = exc
        finally:
            self._full.put(None)

    def _next_piece(self) -> bool:
        if self._current is not None:
            self._free.put(self._current[0])
            self._current = None
        if self._ended:
            return False
        item = self._full.get()
        if item is None:
            self._ended = True
            if self._error is not None:
                raise CheckpointError(f"{self.path} could not be read ({self._error})") from self._error
            return False
        self._current, self._position = item, 0
        return True

    def take(self, nbytes: int) -> memoryview:
        """The next ``nbytes`` of the file, valid until the next call.

        Raises:
            CheckpointError: the file ends first (truncated) or cannot be read.
        """
        if self._current is not None and self._position + nbytes <= self._current[1]:
            start = self._position
            self._position += nbytes
            return memoryview(self._pieces[self._current[0]])[start : start + nbytes]
        if len(self._scratch) < nbytes:  # the range straddles pieces: assembled in a scratch buffer
            self._scratch = bytearray(nbytes)
        out = memoryview(self._scratch)[:nbytes]
        filled = 0
        while filled < nbytes:
            if self._current is None or self._position == self._current[1]:
                if not self._next_piece():
                    raise CheckpointError(
                        f"{self.path} ends before its header says it should: it is truncated; re-save it"
                    )
                continue
            assert self._current is not None
            step = min(nbytes - filled, self._current[1] - self._position)
            out[filled : filled + step] = memoryview(self._pieces[self._current[0]])[
                self._position : self._position + step
            ]
            filled += step
            self._position += step
        return out

    def skip(self, nbytes: int) -> None:
        """Consume ``nbytes`` without using them (the header, gaps between tensors)."""
        while nbytes:
            step = min(nbytes, STREAM_PIECE)
            self.take(step)
            nbytes -= step

    def hexdigest(self) -> str:
        """The whole file's sha256, once the rest of it (if any) is read."""
        while self._next_piece():
            pass
        self._thread.join()
        if self._error is not None:
            raise CheckpointError(f"{self.path} could not be read ({self._error})") from self._error
        return self._digest.hexdigest()

    def cancel(self) -> None:
        self._stop = True
        self._free.put(0)
        while not self._ended:  # unblock a reader waiting for a free piece
            item = self._full.get()
            if item is None:
                self._ended = True
            else:
                self._free.put(item[0])
        self._thread.join()


class SequentialFile:
    """A file written front to back through two aligned staging buffers and one writer thread.

    Writes go out with ``O_DIRECT`` where the file system takes it (virtualized disks spend most of
    a buffered write's CPU in the page cache; the prune's CPU is needed for the masks), else
    buffered. The last, partial block is padded, written, and the file truncated to its length.
    """

    def __init__(self, path: Path, stage_bytes: int | None = None, *, hash_from: int | None = None) -> None:
        import mmap
        from concurrent.futures import ThreadPoolExecutor

        self.path = path
        # bytes from offset hash_from on are hashed on the writing thread, in order (digest)
        self._hash_from = hash_from
        self.digest = hashlib.sha256() if hash_from is not None else None
        self._stage = stage_bytes or STAGE_BYTES
        self._direct = hasattr(os, "O_DIRECT")
        self._fd = self._open(direct=self._direct)
        self._buffers = [mmap.mmap(-1, self._stage) for _ in range(2)]  # anonymous maps: page-aligned
        self._pending: list[Any] = [None, None]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"write {path.name}")
        self._current = 0
        self._fill = 0
        self._offset = 0  # file offset of the current buffer
        self.size = 0

    @property
    def direct(self) -> bool:
        """Whether writes bypass the page cache (``O_DIRECT``); False where the platform or filesystem refuses it."""
        return self._direct

    def _open(self, *, direct: bool) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
        try:
            return os.open(self.path, flags, 0o644)
        except OSError:
            if not direct:
                raise
            self._direct = False
            return os.open(self.path, flags & ~os.O_DIRECT, 0o644)

    def _pwrite(self, view: memoryview, offset: int, hashed: memoryview | None = None) -> None:
        if hashed is not None and self.digest is not None:
            self.digest.update(hashed)
        try:
            written = os.pwrite(self._fd, view, offset)
        except OSError as exc:
            if not self._direct or exc.errno != 22:  # EINVAL: the file system refuses direct I/O
                raise
            os.close(self._fd)
            self._direct = False
            self._fd = os.open(self.path, os.O_WRONLY)
            written = os.pwrite(self._fd, view, offset)
        while written < len(view):  # short writes (signals, quotas) continue where they stopped
            written += os.pwrite(self._fd, view[written:], offset + written)

    def _flush(self, length: int, filled: int | None = None) -> None:
        buffer = memoryview(self._buffers[self._current])[:length]
        hashed = None
        if self._hash_from is not None:  # the written bytes at or after hash_from (not the padding)
            end = length if filled is None else filled
            hashed = buffer[min(end, max(0, self._hash_from - self._offset)) : end]
        self._pending[self._current] = self._pool.submit(self._pwrite, buffer, self._offset, hashed)
        self._offset += length
        self._current ^= 1
        self._fill = 0
        waiting = self._pending[self._current]
        if waiting is not None:
            waiting.result()
            self._pending[self._current] = None

    def write(self, data: Any) -> None:
        """Append ``data`` (any buffer)."""
        source = memoryview(data).cast("B")
        self.size += len(source)
        while len(source):
            take = min(len(source), self._stage - self._fill)
            self._buffers[self._current][self._fill : self._fill + take] = source[:take]
            self._fill += take
            source = source[take:]
            if self._fill == self._stage:
                self._flush(self._stage)

    def reserve(self, nbytes: int, align: int) -> memoryview | None:
        """The next ``nbytes`` of the current staging buffer, to be filled in place and then :meth:`commit`-ted.

        None when they do not fit in it or the position is not a multiple of ``align``: use :meth:`write`.
        """
        if self._fill % align or self._fill + nbytes > self._stage:
            return None
        return memoryview(self._buffers[self._current])[self._fill : self._fill + nbytes]

    def commit(self, nbytes: int) -> None:
        """The ``nbytes`` given by :meth:`reserve` are filled."""
        self._fill += nbytes
        self.size += nbytes
        if self._fill == self._stage:
            self._flush(self._stage)

    def finish(self) -> None:
        """Write what is buffered and close; the file then holds exactly the bytes written."""
        if self._fill:
            padded = -(-self._fill // DIRECT_ALIGN) * DIRECT_ALIGN
            self._buffers[self._current][self._fill : padded] = bytes(padded - self._fill)
            self._flush(padded, self._fill)
        for future in self._pending:
            if future is not None:
                future.result()
        self._pending = [None, None]
        os.ftruncate(self._fd, self.size)
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._pending = [None, None]
        for buffer in self._buffers:
            with contextlib.suppress(BufferError):  # a view still alive: the map is freed when it is collected
                buffer.close()
        self._buffers = []

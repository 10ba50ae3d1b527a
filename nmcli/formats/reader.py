"""The one context-manager base that every reader of a file or folder shares.

A reader opens something in ``__init__`` and releases it in :meth:`Closeable.close`; ``with``
closes it on every exit path. :class:`nmcli.formats.checkpoint.CheckpointReader`,
:class:`nmcli.formats.sharded_checkpoint.ShardedCheckpointReader`, :class:`nmcli.formats.sharded.ShardReader`
and the mask sets of :mod:`nmcli.pipelines.sad` derive from it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import TypeVar

_Self = TypeVar("_Self", bound="Closeable")


class Closeable(ABC):
    """A context manager whose exit calls :meth:`close`."""

    @abstractmethod
    def close(self) -> None:
        """Release what the reader holds open."""

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

"""Reading ``torch.distributed.checkpoint`` state (``finetune --shard fsdp --resume``) without running a file's code.

DCP's own reader unpickles the ``.metadata`` file with ``pickle.load`` and every non-tensor entry
(an optimizer's ``lr``, ``betas``) with ``torch.load(weights_only=False)``: an edited ``OUT.dcp/``
could run any code on ``--resume``. Here the metadata is unpickled with a restricted unpickler that
builds only DCP's own metadata classes (and the sizes, dtypes and paths they hold), and byte entries
are read with ``torch.load(weights_only=True)``; anything else is refused as unreadable state.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_REFUSAL = "which DCP metadata never holds"
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class UnsafeStateError(pickle.UnpicklingError):
    """The sharded state's metadata names something other than DCP's own metadata classes."""


class UnreadableStateError(Exception):
    """DCP could not load the state; ``names_code`` says whether that was a refusal of code in the files."""

    def __init__(self, message: str, names_code: bool) -> None:
        super().__init__(message)
        self.names_code = names_code


class _MetadataOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == _METADATA_MODULE and isinstance(found := super().find_class(module, name), type):
            return found
        raise UnsafeStateError(f"its metadata names {module}.{name}, {_REFUSAL}")


def read_metadata_safely(stream: io.BufferedIOBase | io.BytesIO) -> Any:
    """DCP ``Metadata`` from ``stream``, built only from DCP's metadata classes (never a file's code).

    Raises:
        UnsafeStateError: the pickle names any other global.
    """
    return _MetadataOnly(stream).load()


@functools.cache
def _reader_and_planner() -> tuple[type, type]:
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
            with path.open("rb") as stream:
                metadata = read_metadata_safely(stream)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            checked = io.BytesIO()  # what weights_only accepts, saved again by us for DCP's own load
            torch.save(torch.load(value, weights_only=True), checked)
            checked.seek(0)
            super().load_bytes(read_item, checked)

    return SafeReader, SafePlanner


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """DCP reports a failed metadata read on the root logger with a traceback before raising; the
    caller turns the exception into one line, so the report is dropped while no handler is set."""
    root = logging.getLogger()
    quiet = logging.NullHandler() if not root.handlers else None
    if quiet is not None:
        root.addHandler(quiet)
    try:
        yield
    finally:
        if quiet is not None:
            root.removeHandler(quiet)


def load_dcp(state: dict[str, Any], path: Path) -> None:
    """``torch.distributed.checkpoint.load(state, path)`` in place, with no code run from the files.

    Raises:
        UnreadableStateError: DCP failed (``names_code`` when the files name code to run).
        UnsafeStateError, pickle.UnpicklingError: the files name code to run (outside DCP's wrapping).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader, planner = _reader_and_planner()
    try:
        with _quiet_root_logger():
            dcp.load(state, storage_reader=reader(str(path)), planner=planner())
    except CheckpointException as exc:  # a BaseException: made an ordinary error with its last line
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise UnreadableStateError(lines[-1] if lines else type(exc).__name__, names_code(exc)) from exc


def names_code(exc: BaseException) -> bool:
    """Whether ``exc`` is, or wraps, a refusal to run code named in the files.

    DCP wraps a rank's failure in ``CheckpointException.failures`` and folds a failed metadata read
    into an ``AssertionError``'s text, so both the chain and the text are looked at.
    """
    failures = getattr(exc, "failures", None) or {}
    pending = [exc, *(f[0] if isinstance(f, tuple) else f for f in failures.values())]
    while pending:
        seen = pending.pop()
        if not isinstance(seen, BaseException):
            continue
        if isinstance(seen, pickle.UnpicklingError) or _REFUSAL in str(seen):
            return True
        pending.extend(e for e in (seen.__cause__, seen.__context__) if e is not None)
    return False

"""What an input is, decided in one place, and the one way to open a checkpoint.

:func:`classify` names the kind of any input spec (DESIGN.md section 1: a file, a directory or a
prefixed source) from its name, the files of a directory and, for a ``.safetensors`` file, its
header; every command decides by the :class:`InputKind`, never by testing suffixes and sidecars
itself. :class:`CheckpointSource` is the surface both checkpoint readers share (one nmcli/1 file,
:class:`~nmcli.formats.checkpoint.CheckpointReader`; a sharded directory and its sidecar,
:class:`~nmcli.formats.sharded_checkpoint.ShardedCheckpointReader`), and :func:`open_checkpoint`
picks the reader by the kind. Torch-free at import.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from nmcli.errors import SourceError
from nmcli.formats.checkpoint import Checkpoint, CheckpointMeta, CheckpointReader, write_compressed
from nmcli.formats.checksum import Integrity
from nmcli.formats.sharded import INDEX, SINGLE, is_sharded_checkpoint, sidecar_path
from nmcli.formats.sharded_checkpoint import ShardedCheckpointReader
from nmcli.formats.torchfiles import TRAINING_SUFFIXES

if TYPE_CHECKING:
    import numpy as np
    import torch

# The prefixed model sources (DESIGN.md section 1); anything else names a local file or folder.
PREFIXES = ("hf:", "torchvision:", "timm:", "py:")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


class Form(enum.Enum):
    """What an input is (the value reads after "is ...")."""

    CHECKPOINT = "an nmcli/1 checkpoint file"
    COMPRESSED = "a compressed nmcli checkpoint file"
    SHARDED_CHECKPOINT = "a sharded nmcli checkpoint directory"
    HF_SHARDED = "an HF model directory with sharded safetensors"
    HF_SINGLE = "an HF model directory with one model.safetensors"
    HF_OTHER = "an HF model directory without safetensors weights"
    STATE_DICT = "a plain safetensors state dict"
    TORCH_FILE = "a torch.save file (.pt, .pth, .pth.tar, .bin, .ckpt)"
    EXPORTED = "a torch.export program (.pt2)"
    ONNX = "an ONNX file"
    ENGINE = "a TensorRT engine"
    SOURCE = "a prefixed model source (hf:, torchvision:, timm:, py:)"
    EMPTY = "an empty spec"
    MISSING = "a path that does not exist"
    DIRECTORY = "a directory of no layout nmcli reads"
    OTHER = "a file of no type nmcli reads"
    SPECIAL = "neither a regular file nor a directory (a FIFO, device or socket)"


CHECKPOINT_FORMS = frozenset({Form.CHECKPOINT, Form.COMPRESSED, Form.SHARDED_CHECKPOINT})
HF_FORMS = frozenset({Form.HF_SHARDED, Form.HF_SINGLE, Form.HF_OTHER})
STREAMED_FORMS = frozenset({Form.HF_SHARDED, Form.HF_SINGLE})  # read shard by shard, tensor by tensor
DIRECTORY_FORMS = frozenset({Form.SHARDED_CHECKPOINT, Form.DIRECTORY, *HF_FORMS})
FILE_FORMS = frozenset(
    {
        Form.CHECKPOINT,
        Form.COMPRESSED,
        Form.STATE_DICT,
        Form.TORCH_FILE,
        Form.EXPORTED,
        Form.ONNX,
        Form.ENGINE,
        Form.OTHER,
    }
)
SAFETENSORS_FORMS = frozenset({Form.CHECKPOINT, Form.COMPRESSED, Form.STATE_DICT})


@dataclass(frozen=True)
class InputKind:
    """An input spec and what it is.

    Attributes:
        spec: the spec as given.
        form: what it is (a ``.safetensors`` file by its header, a directory by its files).
        named: what its name alone says, whether or not it exists (``x.onnx`` is :attr:`Form.ONNX`
            even when missing or a directory); :attr:`Form.SOURCE` for a prefixed spec.
        path: the local file or directory (``hf:DIR`` -> ``DIR``, ``~`` expanded), also for a
            missing local path; None for a source that is not local (``hf:ID``, ``torchvision:``...).
        prefix: ``hf:``, ``torchvision:``, ``timm:`` or ``py:``; ``""`` for a bare path.
    """

    spec: str
    form: Form
    named: Form
    path: Path | None
    prefix: str = ""

    @property
    def is_checkpoint(self) -> bool:
        """An nmcli checkpoint: one file (plain or compressed) or a sharded directory."""
        return self.form in CHECKPOINT_FORMS

    @property
    def is_hf_directory(self) -> bool:
        """A directory in the HF layout (``config.json``), which ``hf:DIR`` loads: a plain one, or an
        nmcli sharded checkpoint (a plain HF directory and a sidecar, DESIGN.md section 3c)."""
        return self.form in HF_FORMS or self.form is Form.SHARDED_CHECKPOINT

    @property
    def is_streamable(self) -> bool:
        """A plain HF directory with safetensors weights (sharded or one file), read tensor by tensor."""
        return self.form in STREAMED_FORMS

    @property
    def is_directory(self) -> bool:
        """An existing directory, of any layout."""
        return self.form in DIRECTORY_FORMS

    @property
    def is_file(self) -> bool:
        """An existing regular file, of any type."""
        return self.form in FILE_FORMS


def prefix_of(spec: str) -> str:
    """The source prefix of ``spec`` (``hf:``, ``torchvision:``, ``timm:``, ``py:``), or ``""`` for a path."""
    return next((p for p in PREFIXES if spec.startswith(p)), "")


def form_by_name(name: str | os.PathLike[str]) -> Form:
    """What a local file's name says it is (suffixes compared case-insensitively); :attr:`Form.OTHER` if nothing."""
    text = os.fspath(name).lower()
    if text.endswith(".safetensors"):
        return Form.STATE_DICT
    if text.endswith(TRAINING_SUFFIXES):
        return Form.TORCH_FILE
    if text.endswith(".pt2"):
        return Form.EXPORTED
    if text.endswith(".onnx"):
        return Form.ONNX
    if text.endswith(ENGINE_SUFFIXES):
        return Form.ENGINE
    return Form.OTHER


def named_form(spec: str | os.PathLike[str]) -> Form:
    """What ``spec`` says it is by its text alone, without looking at the disk: :attr:`Form.EMPTY`,
    :attr:`Form.SOURCE` for a prefixed spec, else :func:`form_by_name` (``x.onnx`` is :attr:`Form.ONNX`)."""
    text = os.fspath(spec)
    if not text.strip():
        return Form.EMPTY
    return Form.SOURCE if prefix_of(text) else form_by_name(text)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long, or with a NUL byte: nothing there
        return False


def _directory_form(path: Path) -> Form:
    if is_sharded_checkpoint(path):
        return Form.SHARDED_CHECKPOINT
    if not (path / "config.json").is_file():
        return Form.DIRECTORY
    if (path / INDEX).is_file():
        return Form.HF_SHARDED
    return Form.HF_SINGLE if (path / SINGLE).is_file() else Form.HF_OTHER


def _safetensors_form(path: Path) -> Form:
    with CheckpointReader(path, numpy=True) as reader:  # the header only; no torch
        if reader.compressed:
            return Form.COMPRESSED
        return Form.CHECKPOINT if reader.is_nmcli else Form.STATE_DICT


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # s3://, gs://, https://, file:// ...


def classify(spec: str | os.PathLike[str]) -> InputKind:
    """What ``spec`` is: the one decision every command takes its input's kind from.

    ``hf:X`` is classified as the local ``X`` when it exists (a directory, or a file), else it is a
    hub id (:attr:`Form.SOURCE`). A directory is a sharded checkpoint when it holds the
    ``nmcli.safetensors`` sidecar, an HF directory when it holds ``config.json`` (with an index, a
    ``model.safetensors`` or other weights; the names in an index are checked when it is read). A
    ``.safetensors`` file's header is read (numpy, no torch) to tell a checkpoint, a compressed
    checkpoint and a plain state dict apart; other files are named by their suffix only, never opened.

    Raises:
        SourceError: a URL (``s3://``, ``https://``, ...): nmcli reads local files only.
        CheckpointError: a ``.safetensors`` file whose header cannot be read, or whose nmcli
            metadata is of an unknown format or unreadable (the messages of
            :class:`~nmcli.formats.checkpoint.CheckpointReader`).
    """
    text, named = os.fspath(spec), named_form(spec)
    if _URL.match(text):
        raise SourceError(
            f"{text}: remote URLs are not supported: download the file first (e.g. aws s3 cp, gsutil cp, "
            "curl -LO) and pass the local path"
        )
    if named is Form.EMPTY:
        return InputKind(text, Form.EMPTY, named, None)
    prefix = prefix_of(text)
    if prefix:
        local = Path(os.path.expanduser(text[len(prefix) :])) if prefix == "hf:" and text[len(prefix) :] else None
        if local is None or not _exists(local):
            return InputKind(text, Form.SOURCE, named, None, prefix)
        path = local
    else:
        path = Path(os.path.expanduser(text))
    if not _exists(path):
        return InputKind(text, Form.MISSING, named, path, prefix)
    if path.is_dir():
        return InputKind(text, _directory_form(path), named, path, prefix)
    if not path.is_file():  # a FIFO, a device or a socket: never opened
        return InputKind(text, Form.SPECIAL, named, path, prefix)
    form = form_by_name(path)
    if form is Form.STATE_DICT:
        form = _safetensors_form(path)
    return InputKind(text, form, named, path, prefix)


class CheckpointSource(Protocol):
    """An open nmcli checkpoint, one file or a sharded directory: what both readers answer.

    ``numpy=True`` readers return numpy arrays where the others return torch tensors. Use as a
    context manager (:class:`nmcli.formats.reader.Closeable`).
    """

    path: Path
    meta: CheckpointMeta | None
    raw_metadata: dict[str, str]

    @property
    def is_nmcli(self) -> bool: ...

    @property
    def compressed(self) -> bool: ...

    @property
    def state_names(self) -> list[str]: ...

    @property
    def mask_names(self) -> list[str]: ...

    @property
    def dense_names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def tensor(self, name: str) -> Any: ...

    def packed_mask(self, param: str) -> Any: ...

    def packed_mask_array(self, param: str) -> np.ndarray: ...

    def mask(self, param: str) -> torch.Tensor: ...

    def dense(self, param: str) -> Any: ...

    def iter_state(self) -> Iterator[tuple[str, Any]]: ...

    def load(self, *, dense: bool = True) -> Checkpoint: ...

    def integrity(self, *, shards: bool = True) -> Integrity: ...

    def close(self) -> None: ...

    def __enter__(self) -> CheckpointSource: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def open_checkpoint(target: str | os.PathLike[str] | InputKind, *, numpy: bool = False) -> CheckpointSource:
    """Open a checkpoint with the reader its kind (:func:`classify`) needs.

    A sharded checkpoint directory gets :class:`~nmcli.formats.sharded_checkpoint.ShardedCheckpointReader`;
    anything else :class:`~nmcli.formats.checkpoint.CheckpointReader`, which reads any safetensors
    file (a plain state dict too: ``is_nmcli`` says which) and reports a missing path or a directory.
    ``numpy=True`` reads without torch (headers, shapes and packed masks).

    Raises:
        CheckpointError: the file or directory cannot be read.
    """
    kind = target if isinstance(target, InputKind) else classify(target)
    path = kind.path if kind.path is not None else Path(kind.spec)
    if kind.form is Form.SHARDED_CHECKPOINT:
        return ShardedCheckpointReader(path, numpy=numpy)
    return CheckpointReader(path, numpy=numpy)


def load_checkpoint(path: str | os.PathLike[str], *, dense: bool = True) -> Checkpoint:
    """Read and validate an nmcli/1 checkpoint, one file or a sharded directory (loaded whole, when
    it fits in memory): :meth:`CheckpointSource.load`.

    Raises:
        CheckpointError: unreadable, a plain state dict, or breaking the format.
        InputError: a sharded checkpoint that does not fit in memory.
    """
    with open_checkpoint(path) as reader:
        return reader.load(dense=dense)


def read_meta(path: str | os.PathLike[str]) -> CheckpointMeta | None:
    """The nmcli metadata of a safetensors file or sharded checkpoint directory, or None for a plain
    state dict or a directory that is no checkpoint (a header only: the file's, or the sidecar's)."""
    kind = classify(path)
    if kind.form is Form.SHARDED_CHECKPOINT and kind.path is not None:
        path = sidecar_path(kind.path)
    elif kind.is_directory:
        return None
    with CheckpointReader(path, numpy=True) as reader:
        return reader.meta


def compress_checkpoint(source: str | os.PathLike[str], path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Read an nmcli/1 checkpoint and write its compressed copy to ``path``."""
    return write_compressed(load_checkpoint(source, dense=True), path, force=force, inputs=(source,))


__all__ = [
    "CHECKPOINT_FORMS",
    "DIRECTORY_FORMS",
    "FILE_FORMS",
    "HF_FORMS",
    "PREFIXES",
    "SAFETENSORS_FORMS",
    "STREAMED_FORMS",
    "CheckpointSource",
    "Form",
    "InputKind",
    "classify",
    "compress_checkpoint",
    "form_by_name",
    "load_checkpoint",
    "named_form",
    "open_checkpoint",
    "prefix_of",
    "read_meta",
]

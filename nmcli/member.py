"""Names read from files: a plain file name inside its directory, or exit 2 (DESIGN.md section 7).

A shard index, a sidecar's metadata and an ONNX model's external data all name other files. Such a
name is data from the file's author, so it is never joined to a directory as it is: it must be a
plain file name (no ``..``, no absolute path, no directory separator, no NUL or control character,
within the file system's name limit), and the file it names, where it exists, must be a regular
file inside the directory (a symlink may point within it, never out of it). :func:`member_path`
owns that rule; every reader calls it before anything is opened, so writers only ever see names
that passed. Torch-free (``onnx`` is imported only to read an ONNX file's graph).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from nmcli.errors import InputError

_SHOWN = 60  # characters of an offending name shown in a message
_HF_CACHE_KINDS = ("models--", "datasets--", "spaces--")


def show_name(value: object) -> str:
    """One line of ``repr(value)``, shortened when long (the full length is said)."""
    text = repr(value)
    if len(text) > _SHOWN:
        length = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
        text = f"{text[: _SHOWN - 1]}...' ({length})"
    return text


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def name_problem(name: object, folder: Path | None = None) -> str | None:
    """Why ``name`` is not a plain file name (checked on the text alone), or None when it is."""
    if not isinstance(name, str):
        kinds = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "an array"}
        return f"it is {kinds.get(type(name), 'an object')} in the JSON, not a string"
    if not name:
        return "it is empty"
    if "\x00" in name:
        return "it contains a NUL byte"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it contains a control character"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":" and name[0].isalpha()):
        return "it is an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "it leads out of the directory through '..'"
    if "/" in name or "\\" in name:
        return "it has a directory separator (only file names beside it are allowed)"
    if name == ".":
        return "it is '.', the directory itself"
    try:
        size = len(os.fsencode(name))
    except UnicodeError:
        return "it cannot be encoded as a file name on this system"
    limit = _name_max(folder) if folder is not None else 255
    if size > limit:
        return f"it is {size} bytes long, over the file system's limit of {limit}"
    return None


def _in_hf_cache_blobs(folder: Path, target: Path) -> bool:
    """A Hugging Face cache snapshot (``models--X/snapshots/REV``) links its files to ``models--X/blobs``."""
    snapshots = folder.parent
    repo = snapshots.parent
    return (
        snapshots.name == "snapshots"
        and repo.name.startswith(_HF_CACHE_KINDS)
        and target.is_relative_to(repo / "blobs")
    )


def link_outside(folder: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path | None:
    """Where ``path`` leads when it is a symlink out of ``folder`` (resolved), else None.

    A Hugging Face cache snapshot (``models--X/snapshots/REV``) may link into its own ``models--X/blobs``.
    """
    if not os.path.islink(path):
        return None
    real_folder = Path(os.path.realpath(folder))
    target = Path(os.path.realpath(path))
    if target.is_relative_to(real_folder) or _in_hf_cache_blobs(real_folder, target):
        return None
    return target


def _file_problem(folder: Path, name: str) -> str | None:
    """Why the existing entry ``folder/name`` is not a regular file inside ``folder``, or None (or it is missing)."""
    path = folder / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"it cannot be examined ({exc.strerror or exc})"
    if stat.S_ISLNK(info.st_mode):
        target = link_outside(folder, path)
        if target is not None:
            return f"it is a symlink to {target}, outside the directory"
        try:
            info = os.stat(path)
        except OSError:
            return f"it is a symlink to {os.path.realpath(path)}, which does not exist"
    mode = info.st_mode
    if stat.S_ISREG(mode):
        return None
    kind = (
        "a directory"
        if stat.S_ISDIR(mode)
        else "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a regular file"
    )
    return f"it is {kind}, not a regular file"


def member_path(
    folder: str | os.PathLike[str],
    name: object,
    *,
    source: str | os.PathLike[str],
    entry: str,
    fix: str,
    error: type[InputError] = InputError,
    must_exist: bool = False,
) -> Path:
    """The path of the file ``name`` inside ``folder``, where ``name`` was read from the file ``source``.

    Args:
        folder: the directory the name is relative to.
        name: the name as read (any JSON value).
        source: the file it was read from (named in the error).
        entry: which entry of ``source`` holds it, e.g. ``weight_map['lm_head.weight']``.
        fix: how the user fixes it (the end of the message).
        error: the exception type to raise (an :class:`InputError`: exit 2).
        must_exist: also refuse a name that names no file.

    Raises:
        InputError: (or ``error``) the name is not a plain file name, or the file it names is a symlink
            out of ``folder``, a directory, FIFO, device or socket (or missing, with ``must_exist``).
    """
    root = Path(folder)
    problem = name_problem(name, root)
    if problem is None:
        assert isinstance(name, str)
        problem = _file_problem(root, name)
        if problem is None and must_exist and not os.path.lexists(root / name):
            problem = f"no such file in {root}"
    if problem is not None:
        raise error(f"{source}: {entry} names {show_name(name)}, not a plain file in {root} ({problem}): {fix}")
    assert isinstance(name, str)
    return root / name


def check_plain_name(name: object, *, source: str | os.PathLike[str], entry: str, fix: str) -> str:
    """``name`` when it is a plain file name (:func:`name_problem`); for names of files in another directory.

    Raises:
        InputError: it is not.
    """
    problem = name_problem(name)
    if problem is not None:
        raise InputError(f"{source}: {entry} names {show_name(name)}, not a plain file name ({problem}): {fix}")
    assert isinstance(name, str)
    return name


# --------------------------------------------------------------------------------------------
# ONNX external data


def _graph_tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of a graph and its subgraphs (initializers, sparse ones, node attributes)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Iterable[Any]) -> Iterator[Any]:
    """Every TensorProto in the attributes of ``nodes`` (subgraphs included)."""
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sparse in [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []:
                yield from (sparse.values, sparse.indices)
            for sparse in attr.sparse_tensors:
                yield from (sparse.values, sparse.indices)
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def external_locations(model: Any) -> Iterator[tuple[str, str]]:
    """``(tensor name, location)`` of every tensor of an ``onnx.ModelProto`` stored as external data."""
    tensors = [_graph_tensors(model.graph), *(_node_tensors(f.node) for f in model.functions)]
    for group in tensors:
        for tensor in group:
            for item in tensor.external_data:
                if item.key == "location":
                    yield tensor.name, item.value


def check_onnx_external_data(path: str | os.PathLike[str], model: Any = None) -> Any:
    """Check that every external-data location of the ONNX file ``path`` is a plain file beside it.

    ``model`` is the file's graph loaded without external data, when the caller has it; else it is
    loaded here (``onnx.load(..., load_external_data=False)``: no external file is opened). Returns it.

    Raises:
        InputError: the file is unreadable, or a location is not a plain existing file in its folder.
    """
    file = Path(path)
    if model is None:
        import onnx

        try:
            model = onnx.load(str(file), load_external_data=False)
        except Exception as exc:
            raise InputError(f"{file} is not a readable ONNX file ({type(exc).__name__}: {exc})") from exc
    folder = file.parent
    for tensor, location in external_locations(model):
        member_path(
            folder,
            location,
            source=file,
            entry=f"the external data of tensor {show_name(tensor)}",
            fix="an ONNX model's external data must be a file beside it: re-save it with "
            "onnx.save(model, PATH, save_as_external_data=True, location='NAME.data')",
            must_exist=True,
        )
    return model


__all__ = [
    "check_onnx_external_data",
    "check_plain_name",
    "external_locations",
    "link_outside",
    "member_path",
    "name_problem",
    "show_name",
]

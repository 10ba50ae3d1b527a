"""Atomic, never-clobbering output files.

Every file nmcli writes goes through :func:`atomic_output`: the content is written to a temporary
file in the destination folder and moved into place with ``os.replace`` only when complete, so a
failed command never leaves a partial file. An existing output needs ``force``; an input is never
an output.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from nmcli.errors import OutputExistsError


def check_output_path(
    path: str | os.PathLike[str],
    *,
    force: bool,
    inputs: Iterable[str | os.PathLike[str]] = (),
    option: str = "-o",
) -> Path:
    """Validate an output path before any work is done.

    ``option`` is the option that named the path (``-o``, ``--plot``, ``--output``), for the messages.

    Raises:
        OutputExistsError: the path is one of ``inputs``, exists and ``force`` is false, or its
            folder is missing or not writable.
    """
    out = Path(path)
    resolved = out.resolve()
    for inp in inputs:
        if Path(inp).resolve() == resolved:
            raise OutputExistsError(
                f"output {out} is also an input: nmcli never overwrites an input; choose another {option}"
            )
    if out.is_dir():
        raise OutputExistsError(f"output {out} is a directory: give a file path with {option}")
    if out.exists() and not force:
        raise OutputExistsError(
            f"output {out} already exists: pass --force to overwrite it, or choose another {option}"
        )
    if not out.parent.exists():
        raise OutputExistsError(f"output folder {out.parent} does not exist: create it or choose another {option}")
    check_output_writable(out, option=option)
    return out


def check_output_writable(path: str | os.PathLike[str], *, option: str = "-o") -> Path:
    """Check, before any work, that a file can be created in ``path``'s folder.

    A real probe (a temporary file created and removed) rather than ``os.access``, which is wrong
    for root, ACLs and read-only mounts. :func:`check_output_path` calls it; call it directly for
    an output that is not checked there (e.g. ``bench --output``, a ``--plot`` file).

    Raises:
        OutputExistsError: the folder does not exist, is not a folder, or cannot be written.
    """
    out = Path(path)
    folder = out.parent
    if not folder.is_dir():
        raise OutputExistsError(f"output folder {folder} does not exist: create it or choose another {option}")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name[:64]}.", suffix=".probe", dir=folder)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputExistsError(
            f"cannot write {out}: folder {folder} is not writable ({reason}); choose another {option} or fix its permissions"
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return out


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], *, force: bool = False, inputs: Iterable[str | os.PathLike[str]] = ()
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` when the block succeeds.

    The temporary file is removed if the block raises. The final file gets the usual 0644-style
    permissions (``mkstemp`` creates 0600).
    """
    out = check_output_path(path, force=force, inputs=inputs)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, force: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_output(path, force=force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, force: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), force=force)

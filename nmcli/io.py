"""Atomic, never-clobbering output files.

Every file nmcli writes goes through :func:`atomic_output`: the content is written to a temporary
file in the destination folder and moved into place with ``os.replace`` only when complete, so a
failed command never leaves a partial file. An existing output needs ``force``; an input is never
an output; an output is only ever a regular file (never a device, FIFO or socket, even with
``force``). What the operating system refuses while writing (no space, quota, name too long,
permission, read-only file system, I/O error, file too large) is :class:`OutputWriteError`,
naming the user's output path, never the temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from nmcli.errors import OutputExistsError, OutputWriteError

# OS errors that mean "this output cannot be written here", not a bug of nmcli.
WRITE_ERRNOS = frozenset(
    code
    for code in (
        errno.ENOSPC,
        getattr(errno, "EDQUOT", None),
        errno.ENAMETOOLONG,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.EIO,
        errno.EFBIG,
    )
    if code is not None
)
# Errors that can only come from writing, whatever file the OSError names.
_ALWAYS_WRITE = frozenset(c for c in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS, errno.EFBIG) if c)
_TEMP_STEM = 120  # bytes of the output's name kept in temporary names: far below any NAME_MAX


def os_reason(code: int) -> str:
    """The OS's text for an errno, lower-cased as a clause (``no space left on device``)."""
    text = os.strerror(code)
    return text[:1].lower() + text[1:]


def write_errno(exc: BaseException, path: str | os.PathLike[str] | None = None) -> int | None:
    """The errno of ``exc`` when it is an OS error of writing an output (else None).

    ENOSPC, EDQUOT, EROFS and EFBIG count wherever they come from. EACCES, EPERM, EIO and
    ENAMETOOLONG count only when the error names no file, or a file in ``path``'s folder (the
    output or its temporary file), so an unreadable input is not reported as an unwritable output.
    """
    if not isinstance(exc, OSError) or exc.errno not in WRITE_ERRNOS:
        return None
    if exc.errno in _ALWAYS_WRITE or exc.filename is None or path is None:
        return exc.errno
    out = Path(path).absolute()
    try:
        named = Path(os.fsdecode(exc.filename)).absolute()
    except (TypeError, ValueError):
        return exc.errno
    stem = temp_prefix(out)[1:-1]
    for candidate in (named, *named.parents):  # the output, its temporary file or directory, or a file inside
        if candidate.parent == out.parent and candidate.name.lstrip(".").startswith(stem):
            return exc.errno
    return exc.errno if named == out.parent else None


def write_errno_in(exc: BaseException, path: str | os.PathLike[str] | None = None) -> int | None:
    """:func:`write_errno` of ``exc`` or of an exception it was raised from; for an error raised by C++
    code (torch's exporters, protobuf) that lost its errno, the OS's text of a full or read-only
    file system in its message counts too."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = write_errno(current, path)
        if code is not None:
            return code
        text = str(current)
        for always in sorted(_ALWAYS_WRITE):
            if os.strerror(always) in text or f"[Errno {always}]" in text:
                return always
        current = current.__cause__ or current.__context__
    return None


def output_write_error(path: str | os.PathLike[str], code: int, option: str = "-o") -> OutputWriteError:
    """The one-line error for an output the OS would not let nmcli write."""
    hint = {
        errno.ENOSPC: "free some space or choose another " + option,
        errno.ENAMETOOLONG: "choose a shorter " + option,
        errno.EFBIG: "the file system or a file size limit (ulimit -f) caps it; choose another " + option,
    }.get(code, "choose another " + option)
    return OutputWriteError(f"cannot write {path}: {os_reason(code)}; {hint}")


@contextlib.contextmanager
def writing(path: str | os.PathLike[str], option: str = "-o") -> Iterator[None]:
    """Turn an OS error of writing ``path`` (see :func:`write_errno`) into :class:`OutputWriteError`.

    Raises:
        OutputWriteError: the block raised such an OS error; it names ``path``, not a temporary file.
    """
    try:
        yield
    except OSError as exc:
        code = write_errno(exc, path)
        if code is None:
            raise
        raise output_write_error(path, code, option) from exc


def check_name_length(path: str | os.PathLike[str], *, option: str = "-o") -> None:
    """Refuse a file name or path longer than the file system allows, before any work.

    Raises:
        OutputWriteError: the name exceeds ``NAME_MAX`` or the path ``PATH_MAX`` of its folder.
    """
    out = Path(path)
    folder = out.parent if out.parent.is_dir() else Path(".")
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
        path_max = os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    if len(os.fsencode(out.name)) > name_max or len(os.fsencode(out.absolute())) >= path_max:
        raise OutputWriteError(
            f"cannot write {_shown(out)}: {os_reason(errno.ENAMETOOLONG)} (the file system allows {name_max} bytes "
            f"per name); choose a shorter {option}"
        )


def _shown(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 160 else f"{text[:100]}...{text[-40:]} ({len(text)} characters)"


def check_not_special(path: str | os.PathLike[str], *, option: str = "-o", directory: bool = False) -> None:
    """Refuse an existing output that is not a regular file (a directory for ``directory``), even with --force.

    A symbolic link is judged by what it points to.

    Raises:
        OutputExistsError: ``path`` is a device, FIFO or socket (or, for ``directory``, any non-directory).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if stat.S_ISREG(mode) and not directory:
        return
    if stat.S_ISDIR(mode):
        return
    kind = _kind(mode)
    wanted, plural = ("a directory", "directories") if directory else ("a regular file", "regular files")
    raise OutputExistsError(
        f"output {path} is {kind}, not {wanted}: nmcli writes only {plural} and never replaces {kind}, "
        f"even with --force; choose another {option}"
    )


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file"


def temp_prefix(path: str | os.PathLike[str]) -> str:
    """A prefix for temporary names beside ``path`` that stays within NAME_MAX for any output name."""
    name = Path(path).name[:_TEMP_STEM]
    while len(os.fsencode(name)) > _TEMP_STEM:
        name = name[:-1]
    return f".{name}."


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
        OutputExistsError: the path is one of ``inputs``, exists and ``force`` is false, is not a
            regular file (device, FIFO, socket: even with ``force``), or its folder is missing or
            not writable.
        OutputWriteError: its name is longer than the file system allows.
    """
    out = Path(path)
    check_name_length(out, option=option)
    resolved = out.resolve()
    for inp in inputs:
        if Path(inp).resolve() == resolved:
            raise OutputExistsError(
                f"output {out} is also an input: nmcli never overwrites an input; choose another {option}"
            )
    if out.is_dir():
        raise OutputExistsError(f"output {out} is a directory: give a file path with {option}")
    check_not_special(out, option=option)
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
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(out)[:66], suffix=".probe", dir=folder)
    except OSError as exc:
        if exc.errno is not None and exc.errno in _ALWAYS_WRITE:
            raise output_write_error(out, exc.errno, option) from None
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
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
    option: str = "-o",
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` when the block succeeds.

    ``option`` names the option that gave the path, for the messages.

    The temporary file is removed if the block raises (Ctrl-C and the signals the CLI turns into
    KeyboardInterrupt included). The final file gets the usual 0644-style permissions
    (``mkstemp`` creates 0600).

    Raises:
        OutputExistsError: see :func:`check_output_path`.
        OutputWriteError: the OS refused to write the output (no space, quota, permission, ...),
            in this function or in the block; the message names ``path``, not the temporary file.
    """
    out = check_output_path(path, force=force, inputs=inputs, option=option)
    with writing(out, option):
        fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(out), suffix=".tmp", dir=out.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            check_not_special(out, option=option)  # something may have been created there while the block ran
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(OSError):
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

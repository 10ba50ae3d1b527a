"""The per-user trust store: the code files this user chose to run, by sha256 (DESIGN.md section 7).

Code runs only on the say-so of the person running nmcli, never on a file's. A checkpoint records
the source it was pruned from (a ``py:`` factory, a pickled module); that record is a hint for
rebuilding the architecture, not permission to run it: an attacker can ship a checkpoint that
names their own ``helper.pt`` or ``evil.py`` beside it. So later rebuilds run a recorded source
only with ``--trust`` (or an ``--arch`` given again), unless this user trusted that exact code on
this machine before: when their own command line names a ``py:`` source, or a pickled file with
``--trust``, the CLI records the file's sha256 here. Editing the file changes its sha256, and the
edited file is refused again.

The store is ``$XDG_CONFIG_HOME/nmcli/trusted`` (``~/.config/nmcli/trusted`` by default), one
``<sha256>  <path>`` line per file; the path is for the reader, only the sha256 counts. A missing,
unreadable or garbled store is an empty one; a store that others may write (not owned by this
user, or group/world-writable) is ignored. Writing it never fails a command.

This module imports neither torch nor any user code: resolving a dotted ``py:package.module``
spec to its files walks ``sys.path`` by hand, because ``importlib.util.find_spec("a.b")``
imports (runs) package ``a``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

STORE_ENV = "XDG_CONFIG_HOME"
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar"})
"""Local model files that may be pickles (unpickling runs code); ``.safetensors`` and ``.pt2`` never are."""
NO_CODE_PREFIXES = ("hf:", "torchvision:", "timm:")
"""Sources built by a library from data alone: they run no code that a file chooses."""
_LINE = re.compile(r"^([0-9a-f]{64})  (.*)$")
_MAX_STORE_BYTES = 16 << 20


def store_path() -> Path:
    """The trust store file: ``$XDG_CONFIG_HOME/nmcli/trusted``, else ``~/.config/nmcli/trusted``.

    A relative ``XDG_CONFIG_HOME`` is ignored, as the XDG spec says.

    Raises:
        RuntimeError: there is no home folder to default to (no HOME and no passwd entry).
    """
    base = os.environ.get(STORE_ENV, "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "nmcli" / "trusted"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, in hex (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _store_safe(path: Path) -> bool:
    """Whether ``path`` is a regular file that only this user can write (else its entries count for nothing)."""
    try:
        info = path.stat()
    except OSError:
        return False
    if not path.is_file():
        return False
    others_may_write = hasattr(os, "getuid") and (info.st_uid != os.getuid() or bool(info.st_mode & 0o022))
    return not others_may_write


def _entries() -> dict[str, str]:
    """The store's ``{sha256: path}``: empty when it is missing, unreadable, unsafe or garbled (bad lines skipped)."""
    try:
        path = store_path()
        if not _store_safe(path):
            return {}
        with open(path, "rb") as handle:
            text = handle.read(_MAX_STORE_BYTES).decode("utf-8", errors="replace")
    except (OSError, RuntimeError):
        return {}
    found: dict[str, str] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def is_trusted(path: str | os.PathLike[str]) -> bool:
    """Whether the current content of ``path`` (its sha256 now, not a recorded one) is in the store.

    Never raises: a file that cannot be read, or a missing or garbled store, is not trusted.
    """
    try:
        sha = file_sha256(path)
    except OSError:
        return False
    return sha in _entries()


def remember(path: str | os.PathLike[str]) -> bool:
    """Record the sha256 of ``path`` in the store, so later rebuilds may run this exact file.

    Only for code that the user named on their own command line. The store is rewritten through
    a temp file and ``os.replace`` (readers never see half a file), its folder made 0700 and the
    file 0600. Never raises: when the file or the store cannot be read or written it returns
    False, and the command goes on (later rebuilds then need ``--trust``).

    Returns:
        True when the sha256 is in the store afterwards.
    """
    try:
        sha = file_sha256(path)
        store = store_path()
    except (OSError, RuntimeError):
        return False
    entries = _entries()
    if sha in entries:
        return True
    shown = str(Path(path).absolute())
    entries[sha] = "".join(c if c.isprintable() else "?" for c in shown)
    text = "".join(f"{digest}  {name}\n" for digest, name in entries.items())
    temp: str | None = None
    try:
        store.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            store.parent.chmod(0o700)
        fd, temp = tempfile.mkstemp(prefix=".trusted.", suffix=".tmp", dir=store.parent)  # created 0600
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, store)
        temp = None
    except OSError:
        return False
    finally:
        if temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp)
    return True


# --------------------------------------------------------------------------------------------
# Which files a source runs


def import_search_path() -> list[Path]:
    """The folders ``nmcli.models.sources`` imports a dotted ``py:`` module from: the current folder
    (which it puts first on ``sys.path`` when absent), then ``sys.path``; ``""`` is the current folder."""
    cwd = os.getcwd()
    entries = list(sys.path)
    if cwd not in entries and "" not in entries:
        entries.insert(0, cwd)
    return [Path(entry or cwd) for entry in entries]


def _unverifiable(entry: Path) -> bool:
    """A ``sys.path`` entry that is not a folder but may hold modules (a zip archive, a path inside one)."""
    if entry.is_dir():
        return False
    return entry.exists() or any(parent.is_file() for parent in entry.parents)


def _find(part: str, search: Sequence[Path]) -> tuple[str, list[Path]] | None:
    """Where the import system finds module ``part`` in ``search``, without importing it.

    Follows ``FileFinder``'s order in each folder (a package's ``__init__``, then ``part.<suffix>``;
    extension modules before sources before bytecode) and ``PathFinder``'s across folders
    (namespace portions collected until a regular module or package turns up).

    Returns:
        ``("package", [__init__.py])``, ``("module", [part.py])``, ``("namespace", folders)``, or
        None when the module is compiled, bytecode only, in a zip archive, or not found: code
        whose content nmcli cannot check.
    """
    namespace: list[Path] = []
    extensions = importlib.machinery.EXTENSION_SUFFIXES
    for folder in search:
        if _unverifiable(folder):
            return None
        if not folder.is_dir():
            continue
        package = folder / part
        if package.is_dir():
            if any((package / f"__init__{suffix}").exists() for suffix in extensions):
                return None
            if (package / "__init__.py").is_file():
                return "package", [package / "__init__.py"]
            if (package / "__init__.pyc").exists():
                return None
            namespace.append(package)
        if any((folder / f"{part}{suffix}").exists() for suffix in extensions):
            return None
        if (folder / f"{part}.py").is_file():
            return "module", [folder / f"{part}.py"]
        if (folder / f"{part}.pyc").exists():
            return None
    return ("namespace", namespace) if namespace else None


def _same_as_loaded(name: str, kind: str, found: list[Path]) -> bool:
    """For a module already imported in this process (importing it again runs nothing): whether
    it is the one found on disk. Not imported yet: True."""
    module = sys.modules.get(name)
    if module is None:
        return True
    try:
        if kind == "namespace":
            loaded = {Path(p).resolve() for p in getattr(module, "__path__", [])}
            return loaded == {p.resolve() for p in found}
        origin = getattr(module, "__file__", None)
        return origin is not None and Path(origin).resolve() == found[0].resolve()
    except (OSError, TypeError, RuntimeError):
        return False


def module_files(name: str, search: Sequence[Path] | None = None) -> list[Path] | None:
    """The files that importing dotted module ``name`` runs (each package's ``__init__.py``, then
    the module's own file), found without importing anything.

    Args:
        name: ``package.module`` as in a ``py:package.module:factory`` spec.
        search: the folders to look in (default :func:`import_search_path`).

    Returns:
        The files, the module's own last; None when ``name`` cannot be resolved to plain ``.py``
        files (not found, compiled, in a zip archive, already imported from elsewhere): such a
        module is never trusted on a file's say-so.
    """
    parts = name.split(".")
    if not name or not all(part.isidentifier() for part in parts):
        return None
    folders = list(search) if search is not None else import_search_path()
    files: list[Path] = []
    for i, part in enumerate(parts):
        found = _find(part, folders)
        if found is None:
            return None
        kind, paths = found
        if not _same_as_loaded(".".join(parts[: i + 1]), kind, paths):
            return None
        last = i == len(parts) - 1
        if kind == "namespace":
            if last:
                return None
            folders = paths
        elif kind == "package":
            files.append(paths[0])
            folders = [paths[0].parent]
        else:
            if not last:
                return None
            files.append(paths[0])
    return files


def spec_files(spec: str) -> list[Path] | None:
    """The local files whose code a model source may run when it is built.

    Returns:
        ``[]`` for sources that run no file's code (``hf:``, ``torchvision:``, ``timm:``); the
        file(s) of a ``py:`` spec (a dotted module: see :func:`module_files`); ``[path]`` for a
        local file; None when a ``py:`` spec or a local file cannot be resolved.
    """
    if spec.startswith(NO_CODE_PREFIXES):
        return []
    if spec.startswith("py:"):
        module = spec[3:].rpartition(":")[0]
        if module.endswith(".py"):
            path = Path(module).expanduser()
            return [path] if path.is_file() else None
        return module_files(module)
    path = Path(spec).expanduser()
    return [path] if path.is_file() else None


def spec_trusted(spec: str) -> bool:
    """Whether every file ``spec`` runs is in the store (a source that runs none needs no trust)."""
    files = spec_files(spec)
    return files is not None and all(is_trusted(path) for path in files)


def remember_command_line(specs: Iterable[str | None], *, trust: bool) -> list[Path]:
    """Record the code that the user's own command line names: every ``py:`` source among
    ``specs`` (code by definition), and with ``--trust`` every local file that may be a pickle.

    The CLI calls this with MODEL, ``--arch`` and ``--teacher``; never with what a file records.

    Returns:
        The files now in the store.
    """
    remembered: list[Path] = []
    for spec in specs:
        if not spec:
            continue
        files: list[Path] = []
        if spec.startswith("py:"):
            files = spec_files(spec) or []
        elif trust and not spec.startswith(("hf:", "torchvision:", "timm:")):
            path = Path(spec).expanduser()
            if path.suffix.lower() in PICKLE_SUFFIXES and path.is_file():
                files = [path]
        remembered.extend(path for path in files if remember(path))
    return remembered


__all__ = [
    "NO_CODE_PREFIXES",
    "PICKLE_SUFFIXES",
    "file_sha256",
    "import_search_path",
    "is_trusted",
    "module_files",
    "remember",
    "remember_command_line",
    "spec_files",
    "spec_trusted",
    "store_path",
]

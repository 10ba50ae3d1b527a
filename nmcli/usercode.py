"""Running the user's own code (``py:`` factories, model constructors, trusted pickles) so that it
cannot take over the process: stdout to stderr, ``sys.argv`` set to the spec, ``SystemExit`` as exit 2.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nmcli.errors import SourceError


@contextlib.contextmanager
def user_code(spec: str) -> Iterator[None]:
    """Run code that is the user's (a ``py:`` factory or module, a model's constructor, a
    trusted pickle) so that it cannot take over the process.

    Inside the block ``sys.argv`` is ``[spec]`` (an ``argparse`` in it sees no nmcli options),
    anything it prints goes to stderr (stdout stays one JSON object under ``--json``), and its
    ``SystemExit`` becomes a :class:`SourceError` naming ``spec`` (exit 2) instead of a silent exit.
    """
    saved = sys.argv
    sys.argv = [spec]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except SystemExit as exc:
        raise SourceError(
            f"{spec}: the model code called sys.exit({exc.code!r}) while loading; a factory must return the "
            "model (argparse in it sees no arguments: give defaults)"
        ) from None
    finally:
        sys.argv = saved


@contextlib.contextmanager
def torch_quiet() -> Iterator[None]:
    """Silence torch's warnings and logged tracebacks while nmcli probes a file (it reports its own line)."""
    loggers = [logging.getLogger(name) for name in ("torch", "torch.export", "torch._export", "torch.serialization")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def import_factory(spec: str) -> Any:
    """The callable that a ``py:package.module:name`` or ``py:path/file.py:name`` spec names.

    Raises:
        SourceError: the module or file cannot be imported, or has no such callable.
    """
    body = spec[3:]
    module_name, _, factory_name = body.rpartition(":")
    if not module_name or not factory_name:
        raise SourceError(f"malformed source {spec!r}: write py:package.module:factory or py:path/to/file.py:factory")
    try:
        with user_code(spec):
            module = import_module(spec, module_name)
    except SourceError:
        raise
    except ModuleNotFoundError as exc:
        raise SourceError(
            f"{spec}: module {exc.name!r} not found: check the name, or install the package that has it"
        ) from exc
    except Exception as exc:
        raise SourceError(f"{spec}: importing {module_name} failed ({type(exc).__name__}: {exc})") from exc
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        raise SourceError(f"{spec}: {module_name} has no callable {factory_name!r}: check the factory name")
    return factory


def import_module(spec: str, module_name: str) -> Any:
    """Import the module of a ``py:`` spec (a file path or a dotted name)."""
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise SourceError(f"{spec}: file {path} does not exist")
        mod_name = f"nmcli_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(mod_name)
        if module is None:
            file_spec = importlib.util.spec_from_file_location(mod_name, path)
            if file_spec is None or file_spec.loader is None:
                raise SourceError(f"{spec}: cannot import {path}")
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[mod_name] = module
            # From the .py text itself, never a __pycache__ file beside it: the text is what the
            # trust store's sha256 vouches for (a cached .pyc beside it could hold other code).
            exec(compile(path.read_bytes(), str(path), "exec"), module.__dict__)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    return module

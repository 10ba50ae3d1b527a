"""Training checkpoints: the state dict inside a ``torch.save`` file, read without running its code.

Training loops save more than weights: an ImageNet-style script writes ``{"epoch", "arch",
"state_dict", "best_acc1", "optimizer"}``, others ``{"model": ...}`` or ``{"model_state_dict":
...}``, DeepSpeed ``{"module": ...}``, and many a bare state dict. Keys carry ``module.`` when the
model was wrapped in DataParallel/DistributedDataParallel, ``_orig_mod.`` after ``torch.compile``.

This module owns that knowledge (one rule per question):

* :func:`load_training_state` loads a ``.pt``/``.pth``/``.pth.tar``/``.bin``/``.ckpt`` file with
  ``torch.load(weights_only=True)``, so the file's code never runs; a file that needs full
  unpickling is refused (``TrustRequiredError``, exit 2) unless the caller was given ``--trust``;
* :func:`find_state_dict` finds the state dict inside the common wrappers (:data:`WRAPPER_KEYS`,
  in that order; EMA copies such as :data:`EMA_KEYS` only when asked for with ``key``);
* :func:`strip_wrapper_prefixes` removes the ``module.``/``_orig_mod.`` prefixes that every key
  shares.

Which of the tensors found are sparse layers is :func:`nmcli.models.inferred.infer_layers`' rule.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nmcli.errors import SourceError, TrustRequiredError

if TYPE_CHECKING:
    import torch


TRAINING_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin", ".ckpt")
WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")
EMA_KEYS = ("ema", "state_dict_ema", "model_ema", "ema_state_dict")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 8


@dataclass
class TrainingState:
    """The state dict found in a training checkpoint.

    Attributes:
        path: the file.
        tensors: parameter name -> tensor, prefixes stripped, in the file's order.
        key: where the state dict was found (``"state_dict"``, ``"model/module"``; ``""`` for a bare one).
        stripped: the prefixes removed from every key, outermost first (``["module."]``).
        ignored: the other top-level entries of the file (``epoch``, ``optimizer``, ...), by name.
        module: the ``nn.Module`` itself when the file is a pickled module loaded with ``trust``.
    """

    path: Path
    tensors: dict[str, torch.Tensor]
    key: str = ""
    stripped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    module: Any = None

    def describe(self) -> str:
        """One line: where the state dict was and what was stripped (for notes)."""
        where = f"under {self.key!r}" if self.key else "a bare state dict"
        parts = [f"{len(self.tensors)} tensors {where}"]
        if self.stripped:
            parts.append(f"prefix {' + '.join(repr(p) for p in self.stripped)} stripped")
        if self.ignored:
            more = f" and {len(self.ignored) - _SHOWN} more" if len(self.ignored) > _SHOWN else ""
            parts.append(f"ignored {', '.join(self.ignored[:_SHOWN])}{more}")
        return "; ".join(parts)


def _is_state_dict(obj: Any) -> bool:
    import torch

    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _holds_tensors(obj: Any) -> bool:
    import torch

    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values())


def find_state_dict(obj: Any, key: str | None = None, *, what: str = "the file") -> tuple[dict[str, torch.Tensor], str]:
    """The state dict inside a loaded training checkpoint, and where it was (``"state_dict"``, ``""``).

    A mapping whose values are all tensors is a state dict. Otherwise the first of
    :data:`WRAPPER_KEYS` that holds one (searched again inside it, e.g. ``{"model": {"module":
    ...}}``). ``key`` names the entry to take instead (``"ema"``, ``"state_dict_ema"``; nested
    entries as ``"a/b"``). A wrapper's non-tensor entries (a step counter next to the weights)
    are dropped.

    Raises:
        SourceError: no state dict, or ``key`` is not there; the message lists what the file holds.
    """
    if key:
        node: Any = obj
        trail: list[str] = []
        for part in key.split("/"):
            if not isinstance(node, Mapping) or part not in node:
                raise SourceError(
                    f"{what} has no entry {'/'.join([*trail, part])!r} (--key): it holds {_entries(node)}"
                )
            node, trail = node[part], [*trail, part]
        state = _tensor_entries(node)
        if state is None:
            raise SourceError(f"{what}: entry {key!r} (--key) holds no tensors: the file holds {_entries(obj)}")
        return state, key
    found = _search(obj, depth=0)
    if found is None:
        ema = [k for k in EMA_KEYS if isinstance(obj, Mapping) and _holds_tensors(obj.get(k))]
        hint = f" (its EMA weights: --key {ema[0]})" if ema else ""
        raise SourceError(
            f"{what} holds no state dict{hint}: it holds {_entries(obj)}; name the entry with the weights "
            f"with --key, or save model.state_dict()"
        )
    return found


def _tensor_entries(node: Any) -> dict[str, torch.Tensor] | None:
    import torch

    if not isinstance(node, Mapping):
        return None
    state = {k: v for k, v in node.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return state or None


def _search(obj: Any, depth: int) -> tuple[dict[str, torch.Tensor], str] | None:
    if _is_state_dict(obj):
        return dict(obj), ""
    if not isinstance(obj, Mapping) or depth > 2:
        return None
    for name in WRAPPER_KEYS:
        inner = obj.get(name)
        found = _search(inner, depth + 1)
        if found is not None:
            state, where = found
            return state, f"{name}/{where}" if where else name
        state_like = _tensor_entries(inner) if _holds_tensors(inner) and not _has_mapping(inner) else None
        if state_like is not None:
            return state_like, name
    return None


def _has_mapping(node: Any) -> bool:
    return isinstance(node, Mapping) and any(isinstance(v, Mapping) for v in node.values())


def _entries(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}"
    names = [str(k) for k in obj]
    if not names:
        return "an empty mapping"
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return "entries " + ", ".join(names[:_SHOWN]) + more


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove the :data:`WRAPPER_PREFIXES` that every key shares, repeatedly (``module._orig_mod.``).

    A prefix only some keys carry is kept: it is then part of a parameter's name.
    """
    names = list(state)
    stripped: list[str] = []
    changed = True
    while changed and names:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(n.startswith(prefix) and len(n) > len(prefix) for n in names):
                names = [n[len(prefix) :] for n in names]
                stripped.append(prefix)
                changed = True
    return dict(zip(names, state.values(), strict=True)), stripped


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def holds_exported_program(path: Path) -> bool:
    """A ``torch.export.save`` archive (a zip with ``archive_format``), whatever its suffix."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/archive_format") or n == "archive_format" for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def looks_pickled(path: str | Path) -> bool:
    """A torch zip archive, or a raw pickle (protocol 2-5 header): not random bytes."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def load_training_state(path: str | Path, *, key: str | None = None, trust: bool = False) -> TrainingState:
    """Load the state dict of a ``torch.save`` training checkpoint (see the module doc).

    Raises:
        SourceError: missing file, not a torch file, a TorchScript or torch.export archive (a
            model, not a training checkpoint), or no state dict inside.
        TrustRequiredError: the file holds pickled Python objects beyond tensors and containers
            (a whole ``nn.Module``, an ``argparse.Namespace``) and ``trust`` is false: nothing was
            unpickled.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path} {'is a directory' if path.is_dir() else 'does not exist'}: give a checkpoint file")
    if holds_exported_program(path) or is_torchscript_archive(path):
        raise SourceError(f"{path} is a model archive (TorchScript or torch.export), not a training checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as exc:
            if not looks_pickled(path):
                raise SourceError(
                    f"{path} is not a torch checkpoint (no pickle or torch zip inside): it may be corrupt"
                ) from exc
            if not trust:
                found = _GLOBAL_RE.search(str(exc))
                holds = f" (it holds {found.group(1)})" if found else ""
                raise TrustRequiredError(
                    f"{path} holds pickled Python objects beyond tensors{holds}, and loading them runs the file's "
                    "code; nothing was unpickled: pass --trust if you trust its author, or save "
                    "model.state_dict() instead"
                ) from exc
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=False)
            except Exception as exc2:
                raise SourceError(f"{path}: unpickling failed ({type(exc2).__name__}: {exc2})") from exc2
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SourceError(
                f"{path} is not a readable torch checkpoint ({first[:200]}): it may be truncated or corrupt"
            ) from exc
    if isinstance(obj, torch.nn.Module):  # only reachable with trust
        return TrainingState(path, dict(obj.state_dict()), module=obj)
    state, where = find_state_dict(obj, key, what=str(path))
    tensors, stripped = strip_wrapper_prefixes(state)
    top = where.split("/", 1)[0] if where else None
    ignored = [str(k) for k in obj if str(k) != top] if isinstance(obj, Mapping) and top else []
    return TrainingState(path, tensors, where, stripped, ignored)


def is_torchscript_archive(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``: a zip with ``constants.pkl`` or ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def load_exported_program(path: str | Path) -> Any:
    """``torch.export.load`` of an archive whatever its suffix (``.pt2`` or ``.pt``), without torch's suffix warning."""
    import torch

    with open(path, "rb") as fh:
        data = io.BytesIO(fh.read())
    return torch.export.load(data)


def is_exported_program(path: str | Path) -> bool:
    """Whether ``path`` is a ``torch.export.save`` archive (any suffix)."""
    return Path(path).is_file() and holds_exported_program(Path(path))


_FLOAT_DTYPES = ("F", "BF")


def safetensors_floating(path: str | Path) -> dict[str, bool]:
    """Whether each tensor of a safetensors file is floating point, from its header alone.

    The header is the format's 8-byte little-endian length and JSON (``{"name": {"dtype": "F32",
    ...}}``); floating dtypes are ``F*`` and ``BF16``.

    Raises:
        SourceError: the header cannot be read.
    """
    import json
    import struct

    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        return {
            name: str(entry.get("dtype", "")).startswith(_FLOAT_DTYPES)
            for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict)
        }
    except (OSError, ValueError, struct.error, AttributeError) as exc:
        raise SourceError(f"{path}: unreadable safetensors header ({exc}): it may be truncated or corrupt") from exc


_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


@dataclass(frozen=True)
class TracedInput:
    """One example input that ``torch.jit.trace`` kept in its archive: shape and dtype, never data."""

    shape: tuple[int, ...]
    dtype: str


def _keep_value(value: Any, _tag: Any) -> Any:
    return value


def _tensor_shape(storage: Any, _offset: Any, size: Any, *_rest: Any) -> TracedInput:
    return TracedInput(tuple(int(d) for d in size), str(storage))


class _ShapesOnly(pickle.Unpickler):
    """Unpickles ``traced_inputs.pkl`` into :class:`TracedInput` records: only the few globals that a
    list of plain tensors needs are resolved, to harmless stand-ins; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return _keep_value
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _tensor_shape
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"traced inputs: {module}.{name} is not a tensor")

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "storage" and isinstance(pid[1], str):
            return pid[1]  # the storage's dtype name, from find_class
        raise pickle.UnpicklingError("traced inputs: unexpected storage record")


def traced_inputs(path: str | Path) -> list[TracedInput] | None:
    """The example inputs of ``forward`` that ``torch.jit.trace`` kept in a saved archive
    (``<archive>/traced_inputs.pkl``, torch 2.x), read without running any code (only their shapes
    and dtypes; the data is not stored). None when the archive keeps none or they are not all tensors.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("/traced_inputs.pkl")), None)
            if name is None:
                return None
            data = zf.read(name)
        found = _ShapesOnly(io.BytesIO(data)).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError):
        return None
    inputs = found.get("forward") if isinstance(found, dict) else None
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, TracedInput) for t in inputs):
        return None
    return list(inputs)

"""The ``nmcli/1`` checkpoint format: the only module that reads or writes it (DESIGN.md section 2).

One ``.safetensors`` file that any safetensors reader can open:

* the model's whole state dict under its own names, with **effective** weights (exact ``+0.0``
  where pruned), so the plain architecture loads it;
* ``__nmcli__/mask/<param>``: one bit-packed mask per pruned parameter,
  ``numpy.packbits(mask.reshape(-1), bitorder="little")`` as a 1-D ``uint8`` tensor (the shape
  comes from the layer entry);
* ``__nmcli__/dense/<param>``: optional dense (unmasked) weights, for SR-STE training;
* ``__metadata__``: ``{"format": "nmcli/1", "nmcli": "<JSON>", "nmcli_sha256": "<hex>"}``, the
  JSON holding the writer's version, the model source, the default pattern, the layer entries,
  the input spec and an append-only history; ``nmcli_sha256`` is the sha256 of the file's own
  content, tensor data and metadata (definition: :mod:`nmcli.formats.checksum`; files written before it
  existed lack it). ``inspect`` checks it; it is no signature, so nothing is trusted because of it.

Reading validates everything and reports every problem at once in one :class:`CheckpointError`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nmcli import __version__
from nmcli.errors import CheckpointError
from nmcli.formats.checksum import Integrity, verify_file
from nmcli.io import atomic_output
from nmcli.nm.bits import TensorBits, array_group_counts
from nmcli.nm.codec import INDICES_PREFIX, VALUES_PREFIX, compress_weight, decompress_packed_mask, decompress_weight
from nmcli.nm.pattern import Pattern, parse_pattern

if TYPE_CHECKING:  # torch is imported where tensors are made: headers and packed masks read without it
    import torch
from nmcli.formats.reader import Closeable
from nmcli.formats.safetensors import DataLayout, torch_from_bits, write_safetensors
from nmcli.nm.bits import pack_mask, packed_size, unpack_mask

FORMAT = "nmcli/1"
COMPRESSED_FORMAT = "nmcli/1+compressed"  # N:M values + indices (codec: nmcli.nm.codec), read back as nmcli/1
MASK_PREFIX = "__nmcli__/mask/"
DENSE_PREFIX = "__nmcli__/dense/"
RESERVED_PREFIX = "__nmcli__/"
_MAX_PROBLEMS_SHOWN = 8


@dataclass(frozen=True)
class LayerEntry:
    """One pruned parameter: its N:M pattern, the axis its groups run along, and its shape."""

    param: str
    module: str
    n: int
    m: int
    axis: int
    shape: tuple[int, ...]

    @property
    def pattern(self) -> Pattern:
        return Pattern(self.n, self.m)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {
            "param": self.param,
            "module": self.module,
            "n": self.n,
            "m": self.m,
            "axis": self.axis,
            "shape": list(self.shape),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> LayerEntry:
        return cls(
            param=str(obj["param"]),
            module=str(obj.get("module", str(obj["param"]).rsplit(".", 1)[0])),
            n=int(obj["n"]),
            m=int(obj["m"]),
            axis=int(obj["axis"]),
            shape=tuple(int(d) for d in obj["shape"]),
        )


@dataclass(frozen=True)
class SourceRef:
    """Where the architecture comes from: the source spec, the sha256 of its file, and ``--arch``.

    A hint for rebuilding, never permission to run code (DESIGN.md section 7): whether a recorded
    ``py:`` or pickled source may run is the user's say-so (``--trust``) or their trust store
    (:mod:`nmcli.trust`). A ``"trusted"`` key in older files is ignored.
    """

    spec: str
    sha256: str | None = None
    arch: str | None = None
    shards: tuple[tuple[str, str], ...] = ()  # (file name, sha256) of every input shard (sharded layout)
    model_class: str | None = None  # prune --model-class other than auto: the transformers class the tensors fit

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spec": self.spec, "sha256": self.sha256, "arch": self.arch}
        if self.shards:
            out["shards"] = dict(self.shards)
        if self.model_class:
            out["model_class"] = self.model_class
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SourceRef:
        return cls(
            spec=str(obj.get("spec", "")),
            sha256=obj.get("sha256"),
            arch=obj.get("arch"),
            shards=tuple((str(k), str(v)) for k, v in dict(obj.get("shards") or {}).items()),
            model_class=str(obj["model_class"]) if obj.get("model_class") else None,
        )


@dataclass
class CheckpointMeta:
    """The ``nmcli`` metadata JSON of a checkpoint."""

    source: SourceRef
    pattern: Pattern | None = None
    layers: list[LayerEntry] = field(default_factory=list)
    input_spec: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    method: str | None = None
    version: str = __version__

    def layer(self, param: str) -> LayerEntry:
        for entry in self.layers:
            if entry.param == param:
                return entry
        raise KeyError(param)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "source": self.source.to_json(),
            "pattern": str(self.pattern) if self.pattern else None,
            "method": self.method,
            "layers": [e.to_json() for e in self.layers],
            "input": self.input_spec,
            "history": self.history,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CheckpointMeta:
        pattern = obj.get("pattern")
        return cls(
            source=SourceRef.from_json(obj.get("source") or {}),
            pattern=parse_pattern(pattern) if pattern else None,
            layers=[LayerEntry.from_json(e) for e in obj.get("layers", [])],
            input_spec=obj.get("input"),
            history=list(obj.get("history", [])),
            method=obj.get("method"),
            version=str(obj.get("version", "")),
        )


@dataclass
class Checkpoint:
    """An nmcli/1 checkpoint in memory.

    Attributes:
        tensors: the model's state dict with effective weights.
        masks: boolean masks (full shape) of the pruned parameters, by parameter name.
        dense: optional dense weights of pruned parameters, for SR-STE training.
        meta: source, pattern, layers, input spec and history.
    """

    tensors: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    meta: CheckpointMeta
    dense: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def pattern(self) -> Pattern | None:
        return self.meta.pattern


def history_record(
    command: str, arguments: Mapping[str, Any], metrics: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One append-only history entry: command, arguments, nmcli and torch versions, UTC time, metrics.

    The time is ``SOURCE_DATE_EPOCH`` when that is set (the reproducible-builds convention), so the
    same command on the same input writes the same bytes.
    """
    import torch

    return {
        "command": command,
        "arguments": {k: _jsonable(v) for k, v in arguments.items()},
        "nmcli": __version__,
        "torch": torch.__version__,
        "time": record_time(),
        "metrics": {k: _jsonable(v) for k, v in (metrics or {}).items()},
    }


def record_time() -> str:
    """The UTC time a history record carries: ``SOURCE_DATE_EPOCH`` (seconds) when set, else now."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    when = _dt.datetime.now(_dt.timezone.utc)
    if epoch.isdigit():
        when = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc)
    return when.isoformat(timespec="seconds")


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _check_layer(
    entry: LayerEntry,
    weight: TensorBits | None,
    mask: TensorBits | None,
    dense: TensorBits | None,
    problems: list[str],
) -> None:
    where = f"layer {entry.param}"
    try:
        entry.pattern  # noqa: B018 - validates n and m
    except Exception as exc:  # noqa: BLE001
        problems.append(f"{where}: {exc}")
        return
    if weight is None:
        problems.append(f"{where}: no tensor {entry.param} in the file")
        return
    if weight.shape != entry.shape:
        problems.append(f"{where}: tensor has shape {weight.shape}, layer entry says {entry.shape}")
        return
    if not (0 <= entry.axis < len(entry.shape)) or entry.shape[entry.axis] % entry.m:
        problems.append(f"{where}: axis {entry.axis} of shape {entry.shape} cannot hold groups of {entry.m}")
        return
    if dense is not None and dense.shape != entry.shape:
        problems.append(f"{where}: dense weights have shape {dense.shape}, expected {entry.shape}")
    if mask is None:
        problems.append(f"{where}: mask {MASK_PREFIX}{entry.param} is missing")
        return
    if mask.dtype != "bool":
        if mask.dtype != "uint8" or len(mask.shape) != 1 or mask.size != packed_size(entry.shape):
            problems.append(
                f"{where}: packed mask has {mask.dtype} shape {mask.shape}, expected uint8 "
                f"of {packed_size(entry.shape)} bytes"
            )
            return
        kept_mask = np.unpackbits(mask.bits, count=entry.numel, bitorder="little").view(bool).reshape(entry.shape)
    elif mask.shape != entry.shape:
        problems.append(f"{where}: mask has shape {mask.shape}, expected {entry.shape}")
        return
    else:
        kept_mask = mask.bits != 0
    over = int(np.count_nonzero(array_group_counts(kept_mask, entry.m, entry.axis) > entry.n))
    if over:
        problems.append(
            f"{where}: mask keeps more than {entry.n} of {entry.m} in {over} group(s), breaking {entry.pattern}"
        )
    pruned_nonzero = int(np.count_nonzero(weight.stored_nonzero() & ~kept_mask))
    if pruned_nonzero:
        problems.append(
            f"{where}: {pruned_nonzero} effective weight(s) are non-zero (or -0.0) where the mask prunes them"
        )


def validate_bits(
    tensors: Mapping[str, TensorBits],
    masks: Mapping[str, TensorBits],
    dense: Mapping[str, TensorBits],
    meta: CheckpointMeta,
) -> list[str]:
    """Every problem of a checkpoint given as raw bits, as human sentences (empty when valid).

    The one validation rule of the format: missing or mis-shaped masks, masks that break their
    N:M pattern, effective weights non-zero (or ``-0.0``) where the mask prunes them, entries
    without tensors, masks or dense weights without entries, non-finite values. ``masks`` may
    hold boolean masks or packed ``uint8`` masks. Runs on numpy only (no torch).
    """
    problems: list[str] = []
    layer_params = set()
    for entry in meta.layers:
        if entry.param in layer_params:
            problems.append(f"layer {entry.param} is listed twice")
            continue
        layer_params.add(entry.param)
        _check_layer(entry, tensors.get(entry.param), masks.get(entry.param), dense.get(entry.param), problems)
    for name in sorted(set(masks) - layer_params):
        problems.append(f"mask {MASK_PREFIX}{name} has no layer entry")
    for name in sorted(set(dense) - layer_params):
        problems.append(f"dense weights {DENSE_PREFIX}{name} have no layer entry")
    for kind, group in (("tensor", tensors), ("dense weights", dense)):
        for name, value in group.items():
            if value.nonfinite():
                problems.append(f"{kind} {name} holds NaN or infinite values")
    return problems


def validate_checkpoint(
    tensors: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    dense: Mapping[str, torch.Tensor],
    meta: CheckpointMeta,
) -> list[str]:
    """Every problem of a checkpoint held as torch tensors (see :func:`validate_bits`)."""

    def bits(group: Mapping[str, torch.Tensor]) -> dict[str, TensorBits]:
        return {name: TensorBits.of_tensor(value) for name, value in group.items()}

    return validate_bits(bits(tensors), bits(masks), bits(dense), meta)


def raise_problems(path: str | os.PathLike[str], problems: list[str]) -> None:
    if not problems:
        return
    shown = "; ".join(problems[:_MAX_PROBLEMS_SHOWN])
    more = f"; and {len(problems) - _MAX_PROBLEMS_SHOWN} more" if len(problems) > _MAX_PROBLEMS_SHOWN else ""
    raise CheckpointError(f"{path} is not a valid {FORMAT} checkpoint ({len(problems)} problem(s)): {shown}{more}")


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies where needed; tensors sharing storage (tied weights) are cloned apart."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        if value.numel():
            pointer = value.untyped_storage().data_ptr()
            if pointer in storages:
                value = value.clone()
                pointer = value.untyped_storage().data_ptr()
            storages.add(pointer)
        out[name] = value
    return out


def save_checkpoint(
    ckpt: Checkpoint,
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Validate ``ckpt`` and write it to ``path`` atomically.

    Raises:
        CheckpointError: the checkpoint breaks the format (a bug in the caller, reported clearly).
        OutputExistsError: ``path`` exists without ``force``, or is one of ``inputs``.
    """
    for name in ckpt.tensors:
        if name.startswith(RESERVED_PREFIX):
            raise CheckpointError(f"state dict key {name!r} uses the reserved prefix {RESERVED_PREFIX}")
    import torch

    raise_problems(path, validate_checkpoint(ckpt.tensors, ckpt.masks, ckpt.dense, ckpt.meta))
    payload: dict[str, torch.Tensor] = dict(ckpt.tensors)
    for name, mask in ckpt.masks.items():
        payload[MASK_PREFIX + name] = mask if mask.dtype == torch.uint8 else pack_mask(mask)
    for name, value in ckpt.dense.items():
        payload[DENSE_PREFIX + name] = value
    metadata = {"format": FORMAT, "nmcli": json.dumps(ckpt.meta.to_json(), separators=(",", ":"))}
    payload = _unshared(payload)
    with atomic_output(path, force=force, inputs=inputs) as tmp:
        write_safetensors(payload, tmp, metadata)
    return Path(path)


class _Shape:
    def __init__(self, shape: tuple[int, ...]) -> None:
        self._shape = shape

    def get_shape(self) -> list[int]:
        return list(self._shape)


class _CompressedView:
    """A compressed file (:data:`COMPRESSED_FORMAT`) seen as the plain nmcli/1 file it encodes.

    It answers ``metadata()``, ``keys()``, ``get_tensor()`` and ``get_slice().get_shape()`` as a
    ``safe_open`` handle of the uncompressed checkpoint would, and :meth:`bits`; pruned weights
    and their packed masks are decoded by :func:`nmcli.nm.codec.decompress_weight` on the
    memory-mapped bits, one parameter at a time, on request.
    """

    def __init__(self, handle: Any, layout: DataLayout, *, numpy: bool) -> None:
        self._handle = handle
        self._data = layout
        self._numpy = numpy
        raw = dict(handle.metadata() or {})
        try:
            meta = json.loads(raw["nmcli"])
            self._layers = {str(e["param"]): LayerEntry.from_json(e) for e in meta.get("layers", [])}
        except Exception as exc:  # malformed JSON or entry: one user problem
            raise CheckpointError(
                f"unreadable nmcli metadata in a compressed checkpoint ({exc}): re-create it"
            ) from exc
        self._raw = {**raw, "format": FORMAT, "compressed": COMPRESSED_FORMAT}
        stored = list(handle.keys())
        self._stored = set(stored)
        keys: list[str] = []
        for key in stored:
            if key.startswith(VALUES_PREFIX):
                keys.append(key[len(VALUES_PREFIX) :])
            elif not key.startswith((INDICES_PREFIX, MASK_PREFIX)):
                keys.append(key)
        keys += [MASK_PREFIX + p for p in self._layers if INDICES_PREFIX + p in self._stored]
        self._keys = keys
        self._cache: dict[str, tuple[TensorBits, TensorBits]] = {}

    def metadata(self) -> dict[str, str]:
        return dict(self._raw)

    def keys(self) -> list[str]:
        return list(self._keys)

    def _decoded(self, param: str) -> tuple[TensorBits, TensorBits]:
        """``(effective weight, packed mask)`` of a compressed parameter, as bits."""
        if param not in self._cache:
            entry = self._layers.get(param)
            if entry is None:
                raise CheckpointError(f"compressed weight {param} has no layer entry")
            weight, packed = decode_compressed(entry, self._data.bits, self._stored)
            assert weight is not None
            self._cache = {param: (weight, packed)}  # one: large files still stream
        return self._cache[param]

    def bits(self, name: str) -> TensorBits:
        if VALUES_PREFIX + name in self._stored:
            return self._decoded(name)[0]
        if name.startswith(MASK_PREFIX) and INDICES_PREFIX + name[len(MASK_PREFIX) :] in self._stored:
            return self._decoded(name[len(MASK_PREFIX) :])[1]
        return self._data.bits(name)

    def get_tensor(self, name: str) -> Any:
        decoded = VALUES_PREFIX + name in self._stored or (
            name.startswith(MASK_PREFIX) and INDICES_PREFIX + name[len(MASK_PREFIX) :] in self._stored
        )
        if not decoded:
            return self._handle.get_tensor(name)
        value = self.bits(name)
        return value.bits.view(np.dtype(value.dtype)) if self._numpy else torch_from_bits(value)

    def get_slice(self, name: str) -> Any:
        param = name[len(MASK_PREFIX) :] if name.startswith(MASK_PREFIX) else name
        entry = self._layers.get(param)
        if entry is not None and INDICES_PREFIX + param in self._stored:
            return _Shape(entry.shape if param == name else (packed_size(entry.shape),))
        return self._handle.get_slice(name)


class CheckpointReader(Closeable):
    """Lazy, memory-mapped access to a safetensors file, nmcli/1 or a plain state dict.

    Reads the header only; tensors are read one at a time, so files larger than memory work.
    Use as a context manager.

    ``numpy=True`` opens the file without torch (``safe_open(framework="numpy")``): for the header,
    shapes and packed masks (:meth:`packed_mask_array`), e.g. ``sad`` of checkpoints; its
    :meth:`tensor` returns numpy arrays. :meth:`bits` and :meth:`check` read any tensor's raw bits
    from a numpy memory map whatever ``numpy`` says (bfloat16 included), e.g. ``inspect`` of
    checkpoints. A compressed checkpoint (:data:`COMPRESSED_FORMAT`) is decoded transparently by
    the codec of :mod:`nmcli.nm.codec`, one weight at a time, without torch with ``numpy=True``.
    """

    def __init__(self, path: str | os.PathLike[str], *, numpy: bool = False) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self._decoded = False  # a compressed file, read through nmcli.nm.codec
        self._layout: DataLayout | None = None  # byte offsets for bits(), parsed on first use
        if not self.path.exists():
            raise CheckpointError(f"{self.path} does not exist: check the path")
        if self.path.is_dir():
            raise CheckpointError(f"{self.path} is a directory, not a .safetensors file")
        try:
            self._handle = safe_open(str(self.path), framework="numpy" if numpy else "pt")
            self._file = self._handle.__enter__()
            raw_meta = self._file.metadata() or {}
            if raw_meta.get("format") == COMPRESSED_FORMAT:  # nmcli export --compress: decode transparently
                self._layout = DataLayout(self.path)
                self._file = _CompressedView(self._file, self._layout, numpy=numpy)
                self._decoded = True
                raw_meta = self._file.metadata()
            self._keys = list(self._file.keys())
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError and OSError types
            raise CheckpointError(
                f"{self.path} is not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): "
                "it may be truncated or corrupt; re-create it"
            ) from exc
        self.raw_metadata: dict[str, str] = dict(raw_meta)
        self.meta: CheckpointMeta | None = None
        fmt = self.raw_metadata.get("format")
        if "nmcli" in self.raw_metadata or (fmt or "").startswith("nmcli"):
            if fmt != FORMAT:
                raise CheckpointError(
                    f"{self.path} has format {fmt!r}; this nmcli {__version__} reads {FORMAT}: upgrade nmcli"
                )
            try:
                self.meta = CheckpointMeta.from_json(json.loads(self.raw_metadata["nmcli"]))
            except Exception as exc:  # any malformed JSON or field is the same user problem
                raise CheckpointError(f"{self.path} has unreadable nmcli metadata ({exc}): re-create it") from exc

    def close(self) -> None:
        self._handle.__exit__(None, None, None)

    @property
    def is_nmcli(self) -> bool:
        return self.meta is not None

    @property
    def compressed(self) -> bool:
        """Whether the file is a compressed checkpoint (:data:`COMPRESSED_FORMAT`), decoded on read."""
        return self._decoded

    @property
    def state_names(self) -> list[str]:
        """State-dict keys (masks and dense weights excluded), in file order."""
        return [k for k in self._keys if not k.startswith(RESERVED_PREFIX)]

    @property
    def mask_names(self) -> list[str]:
        return [k[len(MASK_PREFIX) :] for k in self._keys if k.startswith(MASK_PREFIX)]

    @property
    def dense_names(self) -> list[str]:
        return [k[len(DENSE_PREFIX) :] for k in self._keys if k.startswith(DENSE_PREFIX)]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(name)

    def bits(self, name: str) -> TensorBits:
        """Tensor ``name`` as raw bits, memory-mapped from the file with numpy (no torch, no copy).

        A compressed checkpoint's pruned weights and masks are decoded (with numpy too).

        Raises:
            CheckpointError: the header names a dtype nmcli cannot read, or the data is short.
        """
        if self._decoded:
            return self._file.bits(name)
        if self._layout is None:
            self._layout = DataLayout(self.path)
        return self._layout.bits(name)

    def integrity(self, *, shards: bool = True) -> Integrity:
        """The file's content against its recorded sha256 (:mod:`nmcli.formats.checksum`; ``shards`` is
        for the sharded reader's signature). Streamed, torch-free.

        Raises:
            CheckpointError: the file cannot be read.
        """
        return Integrity.combine({self.path.name: verify_file(self.path)})

    def check(self) -> None:
        """Validate the whole nmcli/1 checkpoint on its memory-mapped bits (numpy; no torch).

        The same rule, and the same messages, as :meth:`load` (:func:`validate_bits`).

        Raises:
            CheckpointError: the file is a plain state dict, or breaks the format (all problems listed).
        """
        if self.meta is None:
            raise CheckpointError(f"{self.path} is a plain state dict, not an {FORMAT} checkpoint")
        try:
            tensors = {name: self.bits(name) for name in self.state_names}
            masks = {name: self.bits(MASK_PREFIX + name) for name in self.mask_names}
            dense = {name: self.bits(DENSE_PREFIX + name) for name in self.dense_names}
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{self.path} could not be read ({exc}): it may be truncated; re-create it") from exc
        raise_problems(self.path, validate_bits(tensors, masks, dense, self.meta))

    def packed_mask(self, param: str) -> torch.Tensor:
        return self._file.get_tensor(MASK_PREFIX + param)

    def packed_mask_array(self, param: str) -> np.ndarray:
        """The packed mask of ``param`` as a 1-D numpy array (no torch needed with ``numpy=True``)."""
        value = self._file.get_tensor(MASK_PREFIX + param)
        return (value if isinstance(value, np.ndarray) else value.numpy()).reshape(-1)

    def mask(self, param: str) -> torch.Tensor:
        """The boolean mask of ``param`` (needs a layer entry for its shape)."""
        if self.meta is None:
            raise CheckpointError(f"{self.path} is a plain state dict: it stores no masks")
        return unpack_mask(self.packed_mask(param), self.meta.layer(param).shape)

    def dense(self, param: str) -> torch.Tensor:
        return self._file.get_tensor(DENSE_PREFIX + param)

    def iter_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.state_names:
            yield name, self.tensor(name)

    def load(self, *, dense: bool = True) -> Checkpoint:
        """Read and validate the whole nmcli/1 checkpoint.

        Raises:
            CheckpointError: the file is a plain state dict, or breaks the format (all problems listed).
        """
        if self.meta is None:
            raise CheckpointError(f"{self.path} is a plain state dict, not an {FORMAT} checkpoint")
        try:
            tensors = dict(self.iter_state())
            packed = {name: self.packed_mask(name) for name in self.mask_names}
            dense_tensors = {name: self.dense(name) for name in self.dense_names}
        except Exception as exc:
            raise CheckpointError(f"{self.path} could not be read ({exc}): it may be truncated; re-create it") from exc
        raise_problems(self.path, validate_checkpoint(tensors, packed, dense_tensors, self.meta))
        masks = {e.param: unpack_mask(packed[e.param], e.shape) for e in self.meta.layers}
        return Checkpoint(tensors=tensors, masks=masks, meta=self.meta, dense=dense_tensors if dense else {})


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict of any safetensors file (masks and dense weights of an nmcli/1 file excluded)."""
    with CheckpointReader(path) as reader:
        try:
            return dict(reader.iter_state())
        except Exception as exc:
            raise CheckpointError(f"{path} could not be read ({exc}): it may be truncated; re-create it") from exc


def compressed_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The tensors of the compressed file for ``ckpt`` (layout: :mod:`nmcli.nm.codec`)."""
    out: dict[str, torch.Tensor] = {}
    layers = {e.param: e for e in ckpt.meta.layers}
    for name, value in ckpt.tensors.items():
        entry = layers.get(name)
        out.update(compressed_entries(name, value, ckpt.masks[name], entry) if entry else {name: value})
    for name, value in ckpt.dense.items():
        out[DENSE_PREFIX + name] = value
    return out


def compressed_entries(
    name: str, value: torch.Tensor, mask: torch.Tensor, entry: LayerEntry
) -> dict[str, torch.Tensor]:
    """The stored tensors of one pruned weight in a compressed file: its values and indices, and its
    packed mask only when the indices do not name it exactly (layout: :mod:`nmcli.nm.codec`)."""
    weight = TensorBits.of_tensor(value)
    values, packed, exact = compress_weight(weight.bits, TensorBits.of_tensor(mask).bits.view(bool), entry)
    out = {
        VALUES_PREFIX + name: torch_from_bits(TensorBits(weight.dtype, values)),
        INDICES_PREFIX + name: torch_from_bits(TensorBits("uint8", packed)),
    }
    if not exact:
        out[MASK_PREFIX + name] = pack_mask(mask)
    return out


def decode_compressed(
    entry: LayerEntry, bits: Callable[[str], TensorBits], stored: Container[str], *, weight: bool = True
) -> tuple[TensorBits | None, TensorBits]:
    """``(effective weight, packed mask)`` of one compressed parameter, as bits, from its stored tensors.

    ``bits(name)`` reads a stored tensor's bits and ``stored`` holds the stored names (one file,
    or the shards of a directory). With ``weight=False`` only the indices (and a stored mask) are
    read and the weight is None: the mask alone, e.g. for ``inspect`` and ``sad``.
    """
    param = entry.param
    if not weight:
        if MASK_PREFIX + param in stored:
            return None, bits(MASK_PREFIX + param)
        return None, TensorBits("uint8", decompress_packed_mask(bits(INDICES_PREFIX + param).bits, entry))
    values = bits(VALUES_PREFIX + param)
    dense, mask = decompress_weight(values.bits, bits(INDICES_PREFIX + param).bits, entry)
    if MASK_PREFIX + param in stored:
        packed = bits(MASK_PREFIX + param)
    else:
        packed = TensorBits("uint8", np.packbits(mask.reshape(-1), bitorder="little"))
    return TensorBits(values.dtype, dense), packed


def write_compressed(
    ckpt: Checkpoint,
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    inputs: tuple[str | os.PathLike[str], ...] = (),
    arguments: Mapping[str, Any] | None = None,
) -> Path:
    """Write the compressed copy of ``ckpt`` to ``path`` atomically (:data:`COMPRESSED_FORMAT`).

    Raises:
        CheckpointError: the checkpoint has no pruned layers (nothing to compress).
        OutputExistsError: ``path`` exists without ``force``, or is one of ``inputs``.
    """
    if not ckpt.meta.layers:
        raise CheckpointError("the checkpoint has no pruned layers: there is nothing to compress; prune it first")
    tensors = _unshared(compressed_tensors(ckpt))
    meta = ckpt.meta.to_json()
    meta["history"] = [*meta["history"], history_record("export", {"compress": True, **(arguments or {})})]
    metadata = {"format": COMPRESSED_FORMAT, "nmcli": json.dumps(meta, separators=(",", ":"))}
    with atomic_output(path, force=force, inputs=inputs) as tmp:
        write_safetensors(tensors, tmp, metadata)
    return Path(path)


def is_compressed(metadata: Mapping[str, str] | None) -> bool:
    """Whether a safetensors header's metadata marks an nmcli compressed file."""
    return bool(metadata) and (metadata or {}).get("format") == COMPRESSED_FORMAT

"""SAD between inputs of any kind: their masks (stored, derived from weights, or from a model) compared layer by layer."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nmcli.algorithms.sad import LayerSad, OneSidedLayer, SadResult
from nmcli.errors import (
    CheckpointError,
    MismatchError,
    NmcliError,
    SourceError,
)
from nmcli.formats.checkpoint import MASK_PREFIX
from nmcli.formats.open import CheckpointSource, Form, classify, open_checkpoint
from nmcli.formats.reader import Closeable
from nmcli.formats.torchfiles import (
    is_exported_program,
    is_torchscript_archive,
    load_training_state,
    safetensors_floating,
)
from nmcli.models.hfclass import AUTO, check_recorded_class
from nmcli.models.inferred import INFERRED, infer_layers, tied_to_embeddings, zero_pattern
from nmcli.models.layers import LayerCandidate, find_layers
from nmcli.nm.bits import pack_mask, packed_popcount, packed_size, packed_xor_count
from nmcli.nm.masks import nm_mask
from nmcli.nm.pattern import TENSOR_CORE_PATTERN, Pattern

if TYPE_CHECKING:
    import torch
from nmcli.progress import ProgressCallback

_SHOWN = 3  # names shown per kind of mismatch
_CHUNK_ELEMENTS = 1 << 22  # N:M rule runs on slices of about this many weights (bounds sort temporaries)


@dataclass
class SadReport:
    """SAD over a sequence of inputs: each consecutive pair, and each input against the first.

    With two inputs both lists hold the one result.
    """

    inputs: list[str]
    pairs: list[SadResult]
    vs_first: list[SadResult]
    pattern: PatternChoice | None = None
    masks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def notes(self) -> list[str]:
        """One-line remarks for stderr (how the pattern of derived masks was chosen)."""
        return [self.pattern.note] if self.pattern is not None and self.pattern.note else []

    @property
    def results(self) -> list[SadResult]:
        """Every distinct pair reported (consecutive pairs, then the rest of ``vs_first``)."""
        out = list(self.pairs)
        out.extend(r for r in self.vs_first if all(r is not p for p in self.pairs))
        return out

    def exceeding(self, threshold: float) -> list[SadResult]:
        """The reported pairs whose normalized SAD is above ``threshold``."""
        return [r for r in self.results if r.normalized > threshold]

    def to_json(self) -> dict[str, Any]:
        """Two inputs: one pair's object; several: ``{"inputs", "pairs", "vs_first"}``.

        Both add ``pattern`` and ``pattern_from`` (the pattern that derived masks for inputs
        without stored ones, and why: ``option``, ``inferred``, ``stored``, ``default``; null
        when every input stores masks) and ``masks``: one entry per input saying where its masks
        and layers came from (``layers_from``: ``stored``, ``arch``, ``model`` or ``inferred``,
        the last with every tensor ``taken`` or skipped and the ``reason``).
        """
        extra = {
            "pattern": str(self.pattern.pattern) if self.pattern else None,
            "pattern_from": self.pattern.origin if self.pattern else None,
            "masks": self.masks,
        }
        if len(self.inputs) == 2:
            return {**self.pairs[0].to_json(), **extra}
        return {
            "inputs": list(self.inputs),
            "pairs": [r.to_json() for r in self.pairs],
            "vs_first": [r.to_json() for r in self.vs_first],
            **extra,
        }


@dataclass(frozen=True)
class MaskLayer:
    """A pruned parameter of one input: its shape, and its pattern and axis where known."""

    param: str
    shape: tuple[int, ...]
    pattern: Pattern | None = None
    axis: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class MaskSet(Closeable):
    """The masks of one input, read or derived one layer at a time.

    Attributes:
        label: the input as the user named it.
        origin: ``stored`` (masks read from an nmcli/1 checkpoint) or ``derived`` (N:M rule).
        shapes: every state-dict entry's shape, to check that two inputs hold the same parameters.
        layers: the pruned parameters, in model order.
    """

    origin = "stored"

    def __init__(self, label: str, shapes: Mapping[str, tuple[int, ...]], layers: Sequence[MaskLayer]) -> None:
        self.label = label
        self.shapes = dict(shapes)
        self.layers = {layer.param: layer for layer in layers}

    def packed(self, param: str) -> np.ndarray:
        """The bit-packed mask of ``param`` (``pack_mask`` layout) as a 1-D uint8 array."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the file behind the set, if any."""


class StoredMasks(MaskSet):
    """Masks stored in an nmcli/1 checkpoint, read packed through the memory map (weights untouched)."""

    origin = "stored"

    def __init__(self, reader: CheckpointSource, label: str) -> None:
        assert reader.meta is not None
        self._reader = reader
        names = reader.state_names
        shapes = {name: reader.shape(name) for name in names}
        problems: list[str] = []
        layers: list[MaskLayer] = []
        mask_names = set(reader.mask_names)
        for entry in reader.meta.layers:
            where = f"layer {entry.param}"
            try:
                pattern = entry.pattern
            except NmcliError as exc:
                problems.append(f"{where}: {exc}")
                continue
            if entry.param not in shapes:
                problems.append(f"{where}: no tensor {entry.param} in the file")
            elif shapes[entry.param] != entry.shape:
                problems.append(f"{where}: tensor has shape {shapes[entry.param]}, layer entry says {entry.shape}")
            elif entry.param not in mask_names:
                problems.append(f"{where}: mask {MASK_PREFIX}{entry.param} is missing")
            elif reader.shape(MASK_PREFIX + entry.param) != (packed_size(entry.shape),):
                problems.append(
                    f"{where}: packed mask has shape {reader.shape(MASK_PREFIX + entry.param)}, expected "
                    f"({packed_size(entry.shape)},)"
                )
            else:
                layers.append(MaskLayer(entry.param, entry.shape, pattern, entry.axis))
        listed = {entry.param for entry in reader.meta.layers}
        problems.extend(f"mask {MASK_PREFIX}{name} has no layer entry" for name in sorted(mask_names - listed))
        if problems:
            raise CheckpointError(
                f"{label} is not a valid nmcli/1 checkpoint ({len(problems)} problem(s)): {'; '.join(problems[:8])}"
            )
        super().__init__(label, shapes, layers)

    def packed(self, param: str) -> np.ndarray:
        layer = self.layers[param]
        try:
            packed = self._reader.packed_mask_array(param)
        except Exception as exc:
            raise CheckpointError(
                f"{self.label}: mask of {param} could not be read ({exc}): the file may be truncated; re-create it"
            ) from exc
        if packed.dtype != np.uint8:
            raise CheckpointError(f"{self.label}: mask of {param} is {packed.dtype}, expected packed uint8")
        if layer.pattern is not None:
            kept, allowed = packed_popcount(packed), layer.numel // layer.pattern.m * layer.pattern.n
            if kept > allowed:
                raise CheckpointError(
                    f"{self.label}: mask of {param} keeps {kept} weights, more than {layer.pattern} allows "
                    f"({allowed}): the checkpoint is corrupt; check it with nmcli inspect"
                )
        return packed

    def close(self) -> None:
        self._reader.close()


class DerivedMasks(MaskSet):
    """Masks derived with the N:M rule from weights fetched one at a time by ``weight(param)``."""

    origin = "derived"

    def __init__(
        self,
        label: str,
        shapes: Mapping[str, tuple[int, ...]],
        layers: Sequence[MaskLayer],
        weight: Callable[[str], torch.Tensor],
        closer: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(label, shapes, layers)
        self._weight = weight
        self._closer = closer

    def packed(self, param: str) -> np.ndarray:
        layer = self.layers[param]
        assert layer.pattern is not None and layer.axis is not None
        return derive_packed_mask(self._weight(param), layer.pattern, layer.axis).numpy()

    def close(self) -> None:
        if self._closer is not None:
            self._closer()


class MemoryMasks(MaskSet):
    """Boolean masks held in memory (e.g. during fine-tuning), packed on demand."""

    origin = "stored"

    def __init__(self, label: str, masks: Mapping[str, torch.Tensor]) -> None:
        import torch

        for name, mask in masks.items():
            if mask.dtype != torch.bool:
                raise TypeError(f"mask of {name} is {mask.dtype}: compare_masks takes boolean masks")
        shapes = {name: tuple(mask.shape) for name, mask in masks.items()}
        super().__init__(label, shapes, [MaskLayer(name, shape) for name, shape in shapes.items()])
        self._masks = masks

    def packed(self, param: str) -> np.ndarray:
        return pack_mask(self._masks[param]).numpy()


def derive_packed_mask(
    weight: torch.Tensor, pattern: Pattern, axis: int, *, chunk_elements: int = _CHUNK_ELEMENTS
) -> torch.Tensor:
    """The packed N:M mask of ``weight`` (:func:`nmcli.nm.masks.nm_mask`), computed in slices of about ``chunk_elements``.

    Slices run across a dimension other than ``axis``, so every group stays whole and the result
    equals ``pack_mask(nm_mask(weight, pattern, axis))``, while the sort's temporaries stay bounded.
    """
    import torch

    weight = weight.detach().cpu()
    axis = axis % weight.dim()
    if weight.dim() < 2 or weight.numel() <= chunk_elements:
        return pack_mask(nm_mask(weight, pattern, axis))
    split = 0 if axis != 0 else 1
    step = max(1, chunk_elements // max(1, weight.numel() // weight.shape[split]))
    mask = torch.empty(weight.shape, dtype=torch.bool)
    for start in range(0, weight.shape[split], step):
        part = weight.narrow(split, start, min(step, weight.shape[split] - start))
        mask.narrow(split, start, part.shape[split]).copy_(nm_mask(part, pattern, axis))
    return pack_mask(mask)


LAYERS_FROM_ARCH = "arch"  # --arch: the architecture's prunable layers
LAYERS_FROM_MODEL = "model"  # a model source: its own prunable modules
LAYERS_FROM_INFERRED = INFERRED  # a bare state dict: nmcli.models.inferred.infer_layers


@dataclass
class WeightInput:
    """An input that stores no masks: its tensors, a weight reader, and how its layers are chosen.

    ``candidates(pattern)`` lists its candidate layers (:class:`nmcli.models.layers.LayerCandidate`),
    taken and skipped; :meth:`masks` derives the masks of the taken ones with the N:M rule.
    """

    label: str
    shapes: dict[str, tuple[int, ...]]
    fetch: Callable[[str], torch.Tensor]
    candidates: Callable[[Pattern], list[LayerCandidate]]
    layers_from: str
    closer: Callable[[], None] | None = None
    detail: str = ""

    def masks(self, pattern: Pattern) -> DerivedMasks:
        layers = [MaskLayer(c.param, c.shape, pattern, c.axis) for c in self.candidates(pattern) if c.eligible]
        return DerivedMasks(self.label, self.shapes, layers, self.fetch, self.closer)

    def close(self) -> None:
        if self.closer is not None:
            self.closer()

    def describe(self, pattern: Pattern) -> dict[str, Any]:
        """The ``--json`` entry: where layers came from and, when inferred, every tensor taken or skipped."""
        out: dict[str, Any] = {"input": self.label, "masks": "derived", "layers_from": self.layers_from}
        if self.detail:
            out["checkpoint"] = self.detail
        if self.layers_from == LAYERS_FROM_INFERRED:
            out["tensors"] = [
                {"param": c.param, "shape": list(c.shape), "taken": c.eligible, "reason": c.reason}
                for c in self.candidates(pattern)
            ]
        return out


def _arch_model(arch: str, trust: bool, model_class: str = AUTO) -> torch.nn.Module:
    """Build ``--arch`` for its layer structure only: on the meta device when it allows (no weights)."""
    import torch

    from nmcli.models.sources import build_model, normalize_spec

    spec = normalize_spec(arch)
    cls = _class_for(spec, model_class)
    try:
        with torch.device("meta"):
            model, _ = build_model(spec, trust=trust, pretrained=False, model_class=cls)
        return model
    except Exception:  # noqa: BLE001 - some factories cannot build on meta; the plain build reports real errors
        model, _ = build_model(spec, trust=trust, pretrained=False, model_class=cls)
        return model


def _class_for(spec: str, model_class: str) -> str:
    """``--model-class`` for ``spec`` among several inputs: an ``hf:`` source's class; ``auto`` for the others."""
    return model_class if spec.startswith("hf:") else AUTO


def _state_candidates(
    spec: str,
    shapes: Mapping[str, tuple[int, ...]],
    floating: Mapping[str, bool],
    arch: str | None,
    trust: bool,
    tied: Sequence[str] = (),
    model_class: str = AUTO,
) -> tuple[Callable[[Pattern], list[LayerCandidate]], str]:
    """How a bare state dict's layers are chosen: by ``--arch`` (checked to fit), else inferred."""
    if not arch:
        entries = [(name, shape, floating[name]) for name, shape in shapes.items()]
        return (lambda p: infer_layers(entries, p, tied=tied)), LAYERS_FROM_INFERRED
    model = _arch_model(arch, trust, model_class)

    def by_arch(pattern: Pattern) -> list[LayerCandidate]:
        candidates = find_layers(model, pattern)
        misfits = [c.param for c in candidates if c.eligible and shapes.get(c.param) != c.shape]
        if misfits:
            raise SourceError(
                f"{spec} does not fit --arch {arch}: {', '.join(misfits[:_SHOWN])}"
                f"{' ...' if len(misfits) > _SHOWN else ''} missing or of another shape; check --arch"
            )
        return candidates

    by_arch(Pattern(1, 2))  # fail now, before any mask is read
    return by_arch, LAYERS_FROM_ARCH


def _model_input(spec: str, model: torch.nn.Module) -> WeightInput:
    state = model.state_dict()
    return WeightInput(
        spec,
        {k: tuple(v.shape) for k, v in state.items()},
        state.__getitem__,
        lambda p: find_layers(model, p),
        LAYERS_FROM_MODEL,
    )


def open_input(
    spec: str, *, arch: str | None = None, trust: bool = False, key: str | None = None, model_class: str = AUTO
) -> StoredMasks | WeightInput:
    """One input: an nmcli/1 checkpoint's stored masks, or the weights of anything else.

    Args:
        spec: an nmcli/1 checkpoint, a plain safetensors state dict, a training checkpoint
            (``.pt``/``.pth``/``.pth.tar``/``.bin``/``.ckpt``, see :mod:`nmcli.formats.torchfiles`), or any
            model source (DESIGN.md section 1).
        arch: the architecture of a bare state dict; without it, its layers are inferred
            (:func:`nmcli.models.inferred.infer_layers`).
        trust: allow unpickling a pickled ``nn.Module`` (or a checkpoint that holds other objects).
        key: the entry of a training checkpoint that holds the weights (``ema``).
        model_class: ``--model-class``: the class of an ``hf:`` ``spec`` or ``arch`` (other sources build
            as they are); a checkpoint, never rebuilt here, may only repeat the class it records.

    Raises:
        SourceError/TrustRequiredError/CheckpointError: inputs that cannot be read, or a ``model_class``
            that contradicts a checkpoint's.
    """
    kind = classify(spec)
    if kind.is_checkpoint:  # the stored masks, read with numpy: torch is not even imported
        reader = open_checkpoint(kind, numpy=True)
        try:
            if reader.meta is not None:
                check_recorded_class(spec, reader.meta.source, model_class, arch_hint=False)
            return StoredMasks(reader, spec)
        except BaseException:
            reader.close()
            raise
    path = kind.path
    if path is not None and not kind.prefix:
        if kind.is_directory:
            hint = f": for a transformers model directory write hf:{spec}" if kind.is_hf_directory else ""
            raise SourceError(f"{spec} is a directory, not a checkpoint file{hint}")
        if kind.form is Form.MISSING:
            raise SourceError(f"{spec} does not exist: check the path")
        if kind.form is Form.STATE_DICT:
            state_reader = open_checkpoint(kind)
            try:
                shapes = {name: state_reader.shape(name) for name in state_reader.state_names}
                floating = safetensors_floating(path)
                candidates, layers_from = _state_candidates(spec, shapes, floating, arch, trust, (), model_class)
                return WeightInput(spec, shapes, state_reader.tensor, candidates, layers_from, state_reader.close)
            except BaseException:
                state_reader.close()
                raise
        if kind.form is Form.TORCH_FILE and not (is_torchscript_archive(path) or is_exported_program(path)):
            state = load_training_state(path, key=key, trust=trust)
            if state.module is not None:
                return _model_input(spec, state.module)
            shapes = {k: tuple(v.shape) for k, v in state.tensors.items()}
            floating = {k: v.is_floating_point() for k, v in state.tensors.items()}
            tied = tied_to_embeddings(state.tensors)
            candidates, layers_from = _state_candidates(spec, shapes, floating, arch, trust, tied, model_class)
            return WeightInput(
                spec, shapes, state.tensors.__getitem__, candidates, layers_from, detail=state.describe()
            )
    from nmcli.models.sources import load_model  # torch: only for a model source

    return _model_input(spec, load_model(spec, arch=arch, trust=trust, model_class=_class_for(spec, model_class)).model)


@dataclass(frozen=True)
class PatternChoice:
    """The pattern that derives masks for inputs without stored ones, and why.

    ``origin``: ``option`` (``-p``), ``inferred`` (every derived input's layers already hold it
    in their stored zeros), ``stored`` (the pattern of the inputs with stored masks) or
    ``default`` (2:4). ``note`` is the one line that says so (empty for ``option``).
    """

    pattern: Pattern
    origin: str
    note: str = ""


def choose_pattern(inputs: Sequence[StoredMasks | WeightInput], pattern: Pattern | None) -> PatternChoice | None:
    """The pattern for the derived inputs (None when every input stores its masks).

    Without ``pattern``: the pattern that every candidate layer of every derived input already
    satisfies in its stored zeros (:class:`nmcli.models.inferred.ZeroPattern`), when they all agree;
    else the one pattern of the inputs with stored masks; else 2:4.
    """
    derived = [x for x in inputs if isinstance(x, WeightInput)]
    if not derived:
        return None
    if pattern is not None:
        return PatternChoice(pattern, "option")
    stored = {layer.pattern for x in inputs if isinstance(x, StoredMasks) for layer in x.layers.values()}
    stored.discard(None)
    found = {x.label: zero_pattern(x.candidates, x.fetch).pattern() for x in derived}
    held = set(found.values())
    names = ", ".join(Path(x.label).name for x in derived)
    if None not in held and len(held) == 1 and (not stored or stored == held):
        inferred = held.pop()
        assert inferred is not None
        return PatternChoice(
            inferred, "inferred", f"pattern {inferred} inferred from the zeros stored in {names} (-p overrides)"
        )
    sparse = ", ".join(f"{Path(k).name} holds {v}" for k, v in found.items() if v is not None)
    why = f" ({sparse})" if sparse else ""
    if len(stored) == 1:
        chosen = next(iter(stored))
        assert chosen is not None
        return PatternChoice(
            chosen, "stored", f"masks of {names} derived with {chosen}, the stored masks' pattern{why}; -p overrides"
        )
    return PatternChoice(
        TENSOR_CORE_PATTERN,
        "default",
        f"the weights of {names} are not all N:M-sparse for one pattern{why}: masks derived with 2:4; "
        "pass -p N:M to choose",
    )


def open_masks(
    spec: str,
    *,
    pattern: Pattern | None = None,
    arch: str | None = None,
    trust: bool = False,
    key: str | None = None,
) -> MaskSet:
    """The masks of one input: stored in an nmcli/1 checkpoint, or derived (see :func:`choose_pattern`)."""
    opened = open_input(spec, arch=arch, trust=trust, key=key)
    if isinstance(opened, StoredMasks):
        return opened
    try:
        choice = choose_pattern([opened], pattern)
        assert choice is not None
        return opened.masks(choice.pattern)
    except BaseException:
        opened.close()
        raise


def _listed(names: Sequence[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _layout(layer: MaskLayer) -> str:
    return f"{layer.pattern} along axis {layer.axis}" if layer.pattern is not None else "unknown"


def shape_mismatches(a: MaskSet | WeightInput, b: MaskSet | WeightInput) -> list[str]:
    """Why ``a`` and ``b`` cannot be compared by their headers alone: parameter names and shapes."""
    problems: list[str] = []
    only_a = [n for n in a.shapes if n not in b.shapes]
    only_b = [n for n in b.shapes if n not in a.shapes]
    if only_a:
        problems.append(f"{len(only_a)} parameter(s) only in {a.label}: {_listed(only_a)}")
    if only_b:
        problems.append(f"{len(only_b)} parameter(s) only in {b.label}: {_listed(only_b)}")
    shapes = [f"{n} {a.shapes[n]} vs {b.shapes[n]}" for n in a.shapes if n in b.shapes and a.shapes[n] != b.shapes[n]]
    if shapes:
        problems.append(f"{len(shapes)} shape(s) differ: {_listed(shapes)}")
    return problems


def check_pairs(
    items: Sequence[MaskSet | WeightInput],
    pairs: Sequence[tuple[int, int]],
    check: Callable[[Any, Any], list[str]],
) -> None:
    problems = []
    for i, j in pairs:
        found = check(items[i], items[j])
        if found:
            problems.append(f"{items[i].label} and {items[j].label} cannot be compared: {'; '.join(found)}")
    if problems:
        raise MismatchError(" | ".join(problems))


def mismatches(a: MaskSet, b: MaskSet) -> list[str]:
    """Why ``a`` and ``b`` cannot be compared: parameter names, shapes, patterns (empty when they can)."""
    problems = shape_mismatches(a, b)
    patterns = []
    for name, la in a.layers.items():
        lb = b.layers.get(name)
        if lb is None or la.pattern is None or lb.pattern is None:
            continue
        if (la.pattern, la.axis) != (lb.pattern, lb.axis):
            patterns.append(f"{name} {_layout(la)} vs {_layout(lb)}")
    if patterns:
        problems.append(f"{len(patterns)} layer pattern(s) differ: {_listed(patterns)}")
    return problems


def compare_sets(
    sets: Sequence[MaskSet], pairs: Sequence[tuple[int, int]], progress: ProgressCallback | None = None
) -> list[SadResult]:
    """SAD for each pair of indices into ``sets``, reading each mask once (layer-major order).

    Raises:
        MismatchError: some pair differs in parameter names, shapes or layer patterns (all pairs
            are checked, on headers only, before any mask is read).
    """
    check_pairs(sets, pairs, mismatches)
    order: list[str] = []
    seen: set[str] = set()
    for mask_set in sets:
        for name in mask_set.layers:
            if name not in seen:
                seen.add(name)
                order.append(name)
    results = [SadResult(a=sets[i].label, b=sets[j].label) for i, j in pairs]
    for done, param in enumerate(order, start=1):
        cache: dict[int, np.ndarray] = {}

        def packed(k: int, name: str = param, cache: dict[int, np.ndarray] = cache) -> np.ndarray:
            if k not in cache:
                cache[k] = sets[k].packed(name)
            return cache[k]

        for result, (i, j) in zip(results, pairs, strict=True):
            in_a, in_b = param in sets[i].layers, param in sets[j].layers
            if in_a and in_b:
                total = sets[i].layers[param].numel
                result.layers.append(LayerSad(param, packed_xor_count(packed(i), packed(j)), total))
            elif in_a or in_b:
                k, role = (i, "a") if in_a else (j, "b")
                total = sets[k].layers[param].numel
                result.one_sided.append(OneSidedLayer(param, role, total, total - packed_popcount(packed(k))))
        cache.clear()
        if progress is not None:
            progress(done, len(order), param)
    return results


def layer_sad(param: str, mask_a: torch.Tensor, mask_b: torch.Tensor) -> LayerSad:
    """SAD of one layer from two boolean masks of the same shape.

    Raises:
        MismatchError: the shapes differ.
        TypeError: a mask is not boolean.
    """
    return compare_masks({param: mask_a}, {param: mask_b}).layers[0]


def compare_masks(masks_a: Mapping[str, torch.Tensor], masks_b: Mapping[str, torch.Tensor]) -> SadResult:
    """SAD between two sets of boolean masks (full shape, by parameter name), in ``masks_a`` order.

    The in-memory entry point (fine-tuning's SAD-vs-start figure); it counts exactly as
    ``nmcli sad`` does. A parameter masked in only one set is listed in ``one_sided``.

    Raises:
        MismatchError: a parameter has different mask shapes in the two sets.
        TypeError: a mask is not boolean.
    """
    a, b = MemoryMasks("a", masks_a), MemoryMasks("b", masks_b)
    clash = [f"{n} {a.shapes[n]} vs {b.shapes[n]}" for n in a.shapes if n in b.shapes and a.shapes[n] != b.shapes[n]]
    if clash:
        raise MismatchError(f"masks cannot be compared: {len(clash)} shape(s) differ: {_listed(clash)}")
    # Names masked in only one set are one-sided layers here, not a mismatch: make the shapes agree.
    a.shapes = b.shapes = {**a.shapes, **b.shapes}
    result = compare_sets([a, b], [(0, 1)])[0]
    result.a = result.b = None
    return result


def report_pairs(count: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Index pairs for ``count`` inputs: consecutive ones, and each against the first."""
    return [(i, i + 1) for i in range(count - 1)], [(0, j) for j in range(1, count)]

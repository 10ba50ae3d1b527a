"""Layers inferred from a state dict's names and shapes, when no architecture is at hand (``--infer-layers``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: parsing patterns and reading headers stay torch-free
    import torch
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
from nmcli.formats.checkpoint import read_state_dict
from nmcli.formats.open import Form, classify, form_by_name
from nmcli.formats.torchfiles import (
    TrainingState,
    holds_exported_program,
    is_torchscript_archive,
    load_training_state,
)
from nmcli.models.layers import LayerCandidate, filtered_candidates
from nmcli.nm.masks import group_counts
from nmcli.nm.pattern import TENSOR_CORE_PATTERN, Pattern, parse_pattern

INFERRED = "inferred"
# Words of a tensor's name that mark embeddings, norms and positional tables (see infer_layers).
INFERRED_SKIP_SUBSTRINGS = ("embed", "norm")
INFERRED_SKIP_WORDS = ("bn", "ln", "pos")
INFERRED_SKIP_PREFIXES = ("position",)
# The group sizes M tried when a pattern is inferred from stored zeros.
INFERRED_MS = (2, 4, 8, 16, 32)
_WORD_SPLIT = re.compile(r"[._\-/]+")


def _is_weight_name(name: str) -> bool:
    return name == "weight" or name.endswith(".weight") or name.endswith("proj_weight")


def is_layer_weight(name: str, shape: Sequence[int]) -> bool:
    """Whether a tensor is a layer's weight (named ``*.weight``, 2-D or more), not a bias, buffer or norm scale:
    what a count of layers counts."""
    return _is_weight_name(name) and len(shape) >= 2


def _skip_word(name: str) -> str | None:
    words = [w.rstrip("0123456789") for w in _WORD_SPLIT.split(name.lower())]
    for word in words[:-1] if words and words[-1] == "weight" else words:
        if any(s in word for s in INFERRED_SKIP_SUBSTRINGS) or word in INFERRED_SKIP_WORDS:
            return word
        if word.startswith(INFERRED_SKIP_PREFIXES):
            return word
    return None


def inferred_skip_reason(name: str, shape: Sequence[int], floating: bool, pattern: Pattern) -> str:
    """Why the tensor ``name`` is not an inferred sparse layer under ``pattern`` (empty when it is).

    The rule, in the order checked (the first that fails is the reason):

    1. a floating-point tensor;
    2. named ``*.weight`` (or ``weight``; ``*proj_weight`` for ``nn.MultiheadAttention``):
       biases, buffers and running statistics are not layers;
    3. 2 or more dimensions (1-D: biases, norm scales);
    4. not an embedding, norm or positional table by name: no word of the name (split at ``.``,
       ``_``, ``-``; lower case; trailing digits dropped, so ``bn1`` is ``bn``) contains
       ``embed`` or ``norm``, equals ``bn``, ``ln`` or ``pos``, or starts with ``position``;
    5. input dimension (dim 1) > 1 (a depthwise conv ``[C, 1, k, k]`` has 1);
    6. input dimension a multiple of M.

    Groups run along dim 1: Linear ``[out, in]``, ConvNd ``[out, in, *k]``. What the tensors
    cannot show, the rule cannot know: a grouped (not depthwise) conv, a transposed conv and
    transformers' ``Conv1D`` (GPT-2, ``[in, out]``) look like ordinary layers; a weight tied to
    an embedding is skipped only when the caller says so. Pass ``--arch`` for those models.
    """
    if not floating:
        return "not a floating-point tensor"
    if not _is_weight_name(name):
        return "not named *.weight (a bias, buffer or statistic)"
    if len(shape) < 2:
        return f"{len(shape)}-D (a bias or norm scale)"
    word = _skip_word(name)
    if word is not None:
        return f"an embedding, norm or positional table by name ({word!r})"
    if shape[1] <= 1:
        return f"input dimension {shape[1]} (a depthwise conv)"
    if shape[1] % pattern.m:
        return f"input dimension {shape[1]} is not a multiple of M={pattern.m}"
    return ""


def infer_layers(
    tensors: Iterable[tuple[str, Sequence[int], bool]],
    pattern: Pattern,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    tied: Iterable[str] = (),
) -> list[LayerCandidate]:
    """Decide from ``(name, shape, is_floating)`` alone which tensors are sparse layers (:func:`inferred_skip_reason`).

    Returns one :class:`LayerCandidate` per tensor, taken or skipped with its reason, in the
    given order, in the form :func:`find_layers` returns (``kind`` is ``"inferred"``, ``axis``
    1). ``include``/``exclude`` globs work as in :func:`find_layers`; names in ``tied`` (weights
    sharing storage with an embedding) are skipped.
    """
    tied_names = set(tied)
    layers: list[LayerCandidate] = []
    for name, shape, floating in tensors:
        shape = tuple(int(d) for d in shape)
        reason = inferred_skip_reason(name, shape, floating, pattern)
        if not reason and name in tied_names:
            reason = "weight is tied to an embedding"
        module = name.rsplit(".", 1)[0] if "." in name else ""
        cand = LayerCandidate(module, name, INFERRED, shape, 1, not reason, reason)
        layers.append(filtered_candidates(cand, include, exclude))
    return layers


def most_nonzeros(values: torch.Tensor, axis: int, ms: Sequence[int] = INFERRED_MS) -> dict[int, int]:
    """The most non-zeros in any group of M along ``axis``, for every M in ``ms`` that divides that dimension."""
    out: dict[int, int] = {}
    if values.dim() == 0:
        return out
    for m in ms:
        if values.shape[axis % values.dim()] % m == 0 and values.numel():
            out[m] = int(group_counts(values, m, axis).max())
    return out


@dataclass(frozen=True)
class ZeroPattern:
    """What an input's stored zeros say: per M, the most non-zeros in a group and the layers checked."""

    densest: dict[int, int]
    layers: dict[int, int]

    def pattern(self) -> Pattern | None:
        """The sparsest N:M that every checked layer already satisfies, or None.

        Lowest density N/M first; among equals the M that covers more layers, then 2:4 (the
        pattern tensor cores run), then the smaller M (so a 2:4 model is 2:4, not 4:8). Ms under
        which no layer qualifies are not considered.
        """
        found = [
            (n / m, -self.layers[m], Pattern(max(n, 1), m) != TENSOR_CORE_PATTERN, m, Pattern(max(n, 1), m))
            for m, n in self.densest.items()
            if self.layers.get(m) and n < m
        ]
        return min(found)[4] if found else None


def zero_pattern(
    candidates: Callable[[Pattern], Sequence[LayerCandidate]],
    fetch: Callable[[str], torch.Tensor],
    ms: Sequence[int] = INFERRED_MS,
) -> ZeroPattern:
    """Scan the layers ``candidates(Pattern(1, M))`` deems eligible, for each M in ``ms``, reading each weight once.

    ``fetch(param)`` returns a weight. :meth:`ZeroPattern.pattern` then names the pattern the
    stored zeros satisfy (effective-weight checkpoints), if any.
    """
    by_m = {m: [c for c in candidates(Pattern(1, m)) if c.eligible] for m in ms}
    axes: dict[str, int] = {}
    wanted: dict[str, list[int]] = {}
    for m, layers in by_m.items():
        for c in layers:
            axes[c.param] = c.axis
            wanted.setdefault(c.param, []).append(m)
    densest: dict[int, int] = {}
    for param, param_ms in wanted.items():
        for m, n in most_nonzeros(fetch(param).detach(), axes[param], param_ms).items():
            densest[m] = max(densest.get(m, 0), n)
    return ZeroPattern(densest, {m: len(layers) for m, layers in by_m.items()})


def tied_to_embeddings(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Weights that share storage with a tensor the inferred rule skips by name (a tied LM head).

    A ``torch.save`` file keeps tied weights tied (one storage); safetensors files drop the copy.
    """

    def by_name(name: str) -> bool:
        return "by name" in inferred_skip_reason(name, (2, 2), True, Pattern(1, 2))

    def where(t: torch.Tensor) -> tuple[int, int]:
        return (t.untyped_storage().data_ptr(), int(t.storage_offset()))

    skipped = {where(t) for n, t in state.items() if t.dim() >= 2 and by_name(n)}
    return [n for n, t in state.items() if t.dim() >= 2 and not by_name(n) and where(t) in skipped]


def is_bare_state_dict(target: str | Path) -> bool:
    """Whether ``target`` is a file of weights without an architecture: a training checkpoint
    (:data:`TRAINING_SUFFIXES`, not a TorchScript or torch.export archive) or a safetensors file
    that is not an nmcli checkpoint. Its layers are inferred unless ``--arch`` is given."""
    kind = classify(target)
    if kind.prefix or kind.path is None:
        return False
    if kind.form is Form.STATE_DICT:
        return True
    return kind.form is Form.TORCH_FILE and not (is_torchscript_archive(kind.path) or holds_exported_program(kind.path))


@dataclass
class InferredLayers:
    """A bare state dict with its layers inferred (:func:`nmcli.models.inferred.infer_layers`).

    Attributes:
        state: the tensors and where they were found.
        pattern: the pattern the layers were chosen for.
        pattern_from: ``option`` (given), ``inferred`` (every candidate layer's stored zeros hold
            it: an effective-weight checkpoint) or ``default`` (2:4).
        candidates: one :class:`nmcli.models.layers.LayerCandidate` per tensor (kind ``inferred``),
            taken (``eligible``) or skipped with the reason, in the file's order.
        notes: one-line remarks for stderr (how the pattern was chosen, where the weights were).
    """

    state: TrainingState
    pattern: Any
    pattern_from: str
    candidates: list[Any]
    notes: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[Any]:
        """The candidates taken as sparse layers."""
        return [c for c in self.candidates if c.eligible]


def infer_state_dict_layers(
    path: str | Path,
    *,
    pattern: Any = None,
    key: str | None = None,
    trust: bool = False,
    include: tuple[str, ...] | list[str] = (),
    exclude: tuple[str, ...] | list[str] = (),
) -> InferredLayers:
    """Load a bare state dict (:func:`is_bare_state_dict`) and infer its sparse layers.

    The library side of ``inspect FILE.pt``, ``prune --infer-layers`` and ``sad`` without ``--arch``.
    ``pattern`` (a :class:`nmcli.nm.pattern.Pattern` or ``"N:M"``) is used when given; otherwise the
    pattern every candidate layer's stored zeros already satisfy (:func:`nmcli.models.inferred.zero_pattern`),
    else 2:4, with a note saying which. ``include``/``exclude`` are globs as for ``prune``.

    Raises:
        SourceError/TrustRequiredError: see :func:`load_training_state`; CheckpointError for an
            unreadable safetensors file.
    """

    path = Path(path)
    if form_by_name(path) is Form.STATE_DICT:  # any safetensors file: its state dict, masks excluded
        state = TrainingState(path, read_state_dict(path))
    else:
        state = load_training_state(path, key=key, trust=trust)
    tensors = state.tensors
    entries = [(n, tuple(t.shape), t.is_floating_point()) for n, t in tensors.items()]
    tied = tied_to_embeddings(tensors)
    notes = [f"{path.name}: {state.describe()}"] if state.key or state.stripped else []
    if pattern is not None:
        chosen, origin = parse_pattern(pattern), "option"
    else:
        found = zero_pattern(lambda p: infer_layers(entries, p, tied=tied), tensors.__getitem__).pattern()
        if found is not None:
            chosen, origin = found, "inferred"
            notes.append(f"pattern {found} inferred from the zeros stored in {path.name} (-p overrides)")
        else:
            chosen, origin = TENSOR_CORE_PATTERN, "default"
            notes.append(
                f"the weights of {path.name} are not N:M-sparse for one pattern: using 2:4; pass -p N:M to choose"
            )
    candidates = infer_layers(entries, chosen, include, exclude, tied=tied)
    notes.append(
        f"layers inferred from the tensors (no --arch): {sum(c.eligible for c in candidates)} of {len(candidates)} "
        "tensors taken; pass --arch SPEC to use the architecture's layers"
    )
    return InferredLayers(state, chosen, origin, candidates, notes)

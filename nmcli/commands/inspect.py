"""``inspect``: N:M compliance of the weights of a checkpoint, any model source, or an ONNX file.

For every weight N:M could apply to, the report gives its shape, its sparsity (the share of zeros),
whether it is N:M-compliant along its reduction axis, whether it is *eligible* (a layer the pattern
should hold on), and whether TensorRT's 2:4 sparse kernels could use it. ``-0.0`` counts as zero
for sparsity and compliance (as Polygraphy and TensorRT count it) and is reported per layer in
``negative_zeros`` (sparse compressors that compare bit patterns count it as non-zero). A report is
compliant when every eligible layer is.

An nmcli checkpoint is read from its file only, with numpy on the memory-mapped data: torch is not
imported (:func:`inspect_checkpoint_file`); ``--rebuild`` and ``--arch`` rebuild the model. A sharded
checkpoint directory is measured on its stored masks and its shards' weights are checked against
them, streamed (:func:`inspect_sharded`; ``masks_only`` skips the weights). The content of every
nmcli file is checked against its recorded sha256 (:mod:`nmcli.formats.checksum`): ``integrity`` says
``ok``, ``mismatch`` (edited after nmcli wrote it) or ``absent`` (written before checksums).

What "eligible" means depends on the target:

* a model source: every layer :func:`nmcli.models.layers.find_layers` deems prunable;
* an nmcli/1 checkpoint: the layers the checkpoint records as pruned (layers a prune left dense,
  e.g. with ``--exclude``, are listed but not eligible);
* an ONNX file written by ``nmcli export``: the initializers its ``nmcli.sparse`` metadata
  records as the checkpoint's pruned layers (so eligibility follows the checkpoint);
* any other ONNX file: every Conv (group 1), Gemm and MatMul weight initializer whose reduction
  axis is a multiple of M (axes as :mod:`nmcli.formats.onnx_layout` finds them), except embedding tables
  (initializers that also feed a ``Gather``, e.g. a tied LM head).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from nmcli.errors import BackendUnavailableError, CheckpointError, InputError, SourceError, TrustRequiredError
from nmcli.formats.checkpoint import Checkpoint, CheckpointMeta, CheckpointReader
from nmcli.formats.checksum import MISMATCH, TAMPERED, Integrity
from nmcli.formats.open import Form, InputKind, classify, load_checkpoint, open_checkpoint
from nmcli.formats.sharded_checkpoint import ShardedCheckpointReader
from nmcli.models.hfclass import AUTO, check_recorded_class, not_an_hf_source
from nmcli.models.inferred import infer_state_dict_layers, is_bare_state_dict
from nmcli.models.layers import LayerCandidate, find_layers, tensorrt_reason
from nmcli.models.statenames import StoredNames
from nmcli.nm.bits import TensorBits, bits_compliance, packed_mask_stats
from nmcli.nm.pattern import TENSOR_CORE_PATTERN, Pattern, parse_pattern

if TYPE_CHECKING:  # torch, onnx and the model sources are imported only where a model or an ONNX is read
    import torch
    from torch import nn


# Skip reasons of layers whose structure (not just their size) rules out sparse kernels.
_STRUCTURAL_SKIPS = ("grouped", "transposed", "has no input dimension")
_LAYERS_NAMED = 8  # layers named one per line in the notes; the rest counted


@dataclass(frozen=True)
class LayerInspection:
    """One weight: its N:M state under the inspected pattern.

    Attributes:
        param: the parameter (or ONNX initializer) name.
        shape: the weight's shape, in its own layout.
        axis: the reduction axis that N:M groups run along.
        kind: ``linear``, ``conv``, ``hf_conv1d``, ``attention`` or the ONNX op (``Conv``, ``Gemm``, ``MatMul``).
        sparsity: the share of zero elements (``-0.0`` included).
        compliant: at most N non-zeros in every group of M along ``axis``.
        eligible: whether the pattern should hold on this layer (see the module doc).
        tensorrt: whether TensorRT's 2:4 sparse kernels could use the weight as it is.
        reason: why the layer is not eligible (empty when it is).
        negative_zeros: how many elements are ``-0.0`` (counted as zero for compliance; sparse
            compressors that compare bit patterns count them as non-zero).
        pruned_nonzero: for a sharded checkpoint whose weights were checked, how many stored
            weights are not ``+0.0`` where the mask prunes them (any makes the layer non-compliant);
            None where not checked this way.
    """

    param: str
    shape: tuple[int, ...]
    axis: int
    kind: str
    sparsity: float
    compliant: bool
    eligible: bool
    tensorrt: bool
    reason: str = ""
    negative_zeros: int = 0
    tensorrt_reason: str = ""
    pruned_nonzero: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "param": self.param,
            "shape": list(self.shape),
            "sparsity": self.sparsity,
            "compliant": self.compliant,
            "eligible": self.eligible,
            "tensorrt": self.tensorrt,
            "axis": self.axis,
            "kind": self.kind,
            "reason": self.reason,
            "negative_zeros": self.negative_zeros,
            "tensorrt_reason": self.tensorrt_reason,
            "pruned_nonzero": self.pruned_nonzero,
        }


@dataclass
class InspectReport:
    """The inspection of one target.

    Attributes:
        target: the target as given.
        kind: ``checkpoint``, ``onnx`` or the model source kind (``hf``, ``py``, ``torchscript``, ...).
        pattern: the pattern checked.
        layers: one entry per candidate weight.
        notes: human remarks (e.g. an architecture that could not be rebuilt), for stderr.
        integrity: an nmcli checkpoint's content against its recorded sha256 (None for other targets).
        masks_only: a sharded checkpoint measured on its masks only, its weights not read.
    """

    target: str
    kind: str
    pattern: Pattern
    layers: list[LayerInspection]
    notes: list[str] = field(default_factory=list)
    integrity: Integrity | None = None
    masks_only: bool = False

    @property
    def tampered(self) -> str:
        """The tampering sentence when a file does not match its recorded sha256, else empty."""
        if self.integrity is None or self.integrity.status != MISMATCH:
            return ""
        return f"{', '.join(self.integrity.mismatched)}: {TAMPERED}"

    @property
    def eligible(self) -> list[LayerInspection]:
        return [layer for layer in self.layers if layer.eligible]

    @property
    def violations(self) -> list[LayerInspection]:
        """Eligible layers that are not compliant."""
        return [layer for layer in self.layers if layer.eligible and not layer.compliant]

    @property
    def compliant(self) -> bool:
        """Every eligible layer is N:M-compliant (vacuously true without eligible layers)."""
        return not self.violations

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "pattern": str(self.pattern),
            "compliant": self.compliant,
            "eligible_layers": len(self.eligible),
            "nothing_eligible": not self.eligible,
            "integrity": self.integrity.status if self.integrity else None,
            "tampered_files": list(self.integrity.mismatched) if self.integrity else [],
            "masks_only": self.masks_only,
            "layers": [layer.to_json() for layer in self.layers],
        }


def _measure(
    param: str, values: torch.Tensor, axis: int, kind: str, eligible: bool, reason: str, pattern: Pattern
) -> LayerInspection:
    return _measure_bits(param, TensorBits.of_tensor(values), axis, kind, eligible, reason, pattern)


def _measure_bits(
    param: str, values: TensorBits, axis: int, kind: str, eligible: bool, reason: str, pattern: Pattern
) -> LayerInspection:
    """One layer's report from its raw bits (numpy): the one measuring rule of every inspect path."""
    shape = values.shape
    if not 0 <= axis < len(shape):
        zeros = values.size - int(np.count_nonzero(values.stored_nonzero()))
        sparsity = zeros / values.size if values.size else 0.0
        return LayerInspection(param, shape, axis, kind, sparsity, False, eligible, False, reason)
    state = bits_compliance(values, pattern, axis)
    trt_reason = reason
    if not any(word in reason for word in _STRUCTURAL_SKIPS):
        trt_reason = tensorrt_reason(shape, axis, state.compliant_24)
    return LayerInspection(
        param,
        shape,
        axis,
        kind,
        state.sparsity,
        state.compliant,
        eligible,
        not trt_reason,
        reason,
        state.negative_zeros,
        trt_reason,
    )


def inspect_model(model: nn.Module, pattern: Pattern, *, target: str = "", kind: str = "model") -> InspectReport:
    """Inspect every candidate layer of a model: eligible where :func:`find_layers` says prunable."""
    state = model.state_dict()
    layers = [
        _measure(c.param, state[c.param].detach(), c.axis, c.kind, c.eligible, c.reason, pattern)
        for c in find_layers(model, pattern)
        if c.param in state
    ]
    return InspectReport(target, kind, pattern, layers)


def inspect_checkpoint(
    ckpt: Checkpoint, pattern: Pattern, *, model: nn.Module | None = None, target: str = ""
) -> InspectReport:
    """Inspect a checkpoint's weights: eligible are the layers it records as pruned.

    With ``model`` (the rebuilt architecture), the layers a prune left dense are listed too, with
    their reasons; without it only the pruned layers are. Layers are named as the checkpoint stores
    them (a base model's layers in files saved with a head: :mod:`nmcli.models.statenames`).
    """
    entries = {e.param: e for e in ckpt.meta.layers}
    candidates: list[LayerCandidate] = find_layers(model, pattern) if model is not None else []
    names = StoredNames.of(model, ckpt.tensors) if model is not None else StoredNames()
    layers: list[LayerInspection] = []
    seen: set[str] = set()
    for cand in candidates:
        param = names.stored(cand.param)
        if param not in ckpt.tensors:
            continue
        seen.add(param)
        values = ckpt.tensors[param]
        entry = entries.get(param)
        if entry is None:
            reason = cand.reason or "left dense in this checkpoint (not pruned)"
            layers.append(_measure(param, values, cand.axis, cand.kind, False, reason, pattern))
            continue
        reason = _size_reason(entry.shape, entry.axis, pattern)
        layers.append(_measure(param, values, entry.axis, cand.kind, not reason, reason, pattern))
    for param, entry in entries.items():
        if param in seen:
            continue
        reason = _size_reason(entry.shape, entry.axis, pattern)
        layers.append(_measure(param, ckpt.tensors[param], entry.axis, "pruned", not reason, reason, pattern))
    return InspectReport(target, "checkpoint", pattern, layers)


def inspect_checkpoint_file(
    path: str | os.PathLike[str], pattern: Pattern | None = None, *, target: str = ""
) -> InspectReport:
    """Inspect an nmcli/1 checkpoint from its file only, without torch: eligible are its pruned layers.

    The file's content is checked against its recorded sha256 (``integrity``), the file validated
    (:meth:`nmcli.formats.checkpoint.CheckpointReader.check`: the problems :func:`nmcli.formats.open.load_checkpoint`
    reports), then every pruned layer is measured on the memory-mapped bits. The layers equal
    :func:`inspect_checkpoint` of the loaded checkpoint without a model.

    Raises:
        CheckpointError: a plain state dict, or a checkpoint that breaks the format (saying so
            when its content does not match its recorded sha256 either).
    """
    integrity = file_integrity(path)
    with CheckpointReader(path, numpy=True) as reader:
        try:
            reader.check()
        except CheckpointError as exc:
            if integrity.status != MISMATCH:
                raise
            raise CheckpointError(f"{exc}; and its {TAMPERED}") from exc
        assert reader.meta is not None  # check() raises for a plain state dict
        nm = pattern or reader.meta.pattern or TENSOR_CORE_PATTERN
        layers: list[LayerInspection] = []
        for entry in reader.meta.layers:
            reason = _size_reason(entry.shape, entry.axis, nm)
            layers.append(
                _measure_bits(entry.param, reader.bits(entry.param), entry.axis, "pruned", not reason, reason, nm)
            )
    return InspectReport(target or str(path), "checkpoint", nm, layers, integrity=integrity)


def file_integrity(path: str | os.PathLike[str]) -> Integrity:
    """An nmcli file's content, or a sharded directory's sidecar and compressed shards, against the recorded sha256."""
    with open_checkpoint(path, numpy=True) as reader:
        return reader.integrity()


def inspect_sharded(
    folder: str | os.PathLike[str], pattern: Pattern | None = None, *, target: str = "", masks_only: bool = False
) -> InspectReport:
    """Inspect a sharded checkpoint directory (DESIGN.md section 3c): numpy only, no model is built.

    Sparsity and compliance are measured on the stored masks; then every pruned weight is read
    from its shard, streamed one tensor at a time, and checked against its mask (exactly ``+0.0``
    wherever the mask prunes): a layer that breaks its mask is not compliant. ``masks_only``
    skips that read (the fast mode: the weights are trusted to follow the masks, and the report
    says so). The sidecar's content (and each compressed shard's, unless ``masks_only``) is
    checked against its recorded sha256.
    """
    import threading

    stop = threading.Event()
    # three streams at once, each releasing the GIL in its I/O and numpy/hashlib work: the masks'
    # statistics here, the shards' weights against the masks and the checksums on two threads
    with (
        ShardedCheckpointReader(folder, numpy=True) as reader,
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="nmcli-inspect") as pool,
    ):
        assert reader.meta is not None
        params = [e.param for e in reader.meta.layers]
        hashing = pool.submit(reader.integrity, shards=not masks_only)
        weights = None if masks_only else pool.submit(reader.pruned_nonzero, params, stop.is_set)
        try:
            nm = pattern or reader.meta.pattern or TENSOR_CORE_PATTERN
            stats = []
            for entry in reader.meta.layers:
                packed = reader.packed_mask_array(entry.param)
                kept, compliant = packed_mask_stats(packed, entry.shape, entry.axis, nm.n, nm.m)
                compliant_24 = (
                    compliant
                    if nm == TENSOR_CORE_PATTERN
                    else packed_mask_stats(
                        packed, entry.shape, entry.axis, TENSOR_CORE_PATTERN.n, TENSOR_CORE_PATTERN.m
                    )[1]
                )
                stats.append((entry, kept, compliant, compliant_24))
            broken = weights.result() if weights is not None else {}
            integrity = hashing.result()
        finally:
            stop.set()  # an error or Ctrl-C here: the weight check stops after its current read
    layers: list[LayerInspection] = []
    for entry, kept, compliant, compliant_24 in stats:
        reason = _size_reason(entry.shape, entry.axis, nm)
        compliant = compliant and not reason and not broken.get(entry.param)
        compliant_24 = compliant_24 and not broken.get(entry.param)
        trt_reason = tensorrt_reason(entry.shape, entry.axis, compliant_24)
        layers.append(
            LayerInspection(
                param=entry.param,
                shape=entry.shape,
                axis=entry.axis,
                kind="pruned",
                sparsity=1.0 - kept / entry.numel if entry.numel else 0.0,
                compliant=compliant,
                eligible=not reason,
                tensorrt=not trt_reason,
                reason=reason,
                tensorrt_reason=trt_reason,
                pruned_nonzero=broken.get(entry.param),
            )
        )
    report = InspectReport(target or str(folder), "checkpoint", nm, layers, integrity=integrity, masks_only=masks_only)
    breaking = [(param, count) for param, count in broken.items() if count]
    for param, count in breaking[:_LAYERS_NAMED]:
        report.notes.append(
            f"layer {param}: {count} stored weight(s) in the shards are non-zero (or -0.0) where its mask "
            "prunes them: the shards do not follow the masks"
        )
    if len(breaking) > _LAYERS_NAMED:
        report.notes.append(
            f"and {len(breaking) - _LAYERS_NAMED} more layer(s) whose weights break their masks "
            "(pruned_nonzero per layer in --json)"
        )
    if masks_only:
        report.notes.append(
            "sharded checkpoint, --masks-only: measured on its stored masks only (the shards' weights were not "
            "read, nor checked against the masks)"
        )
    else:
        report.notes.append(
            "sharded checkpoint: measured on its stored masks, and every pruned weight in the shards checked "
            "against its mask; --rebuild loads it whole"
        )
    return report


def _size_reason(shape: tuple[int, ...], axis: int, pattern: Pattern) -> str:
    if shape[axis] % pattern.m:
        return f"input dimension {shape[axis]} is not a multiple of M={pattern.m}"
    return ""


def inspect_onnx(model: Any, pattern: Pattern, *, target: str = "") -> InspectReport:
    """Inspect the Conv/Gemm/MatMul weight initializers of an ONNX model along their reduction axes.

    Eligible are the initializers that ``nmcli export`` recorded as pruned layers in the file's
    ``metadata_props`` when it has that record; without it, every weight whose reduction axis
    holds groups of M, except embedding tables (initializers that also feed a ``Gather``, such as
    a tied LM head's).
    """
    from nmcli.formats.onnx_layout import find_weights, gather_tables, initializer_tensor, sparse_layers

    recorded = sparse_layers(model)
    tables = gather_tables(model) if recorded is None else set()
    layers: list[LayerInspection] = []
    for weight in find_weights(model):
        values = initializer_tensor(model, weight.name)
        if weight.groups != 1:
            reason = f"grouped or depthwise convolution (group={weight.groups})"
        elif recorded is not None and weight.name not in recorded:
            reason = "not a pruned layer of the exported checkpoint (nmcli.sparse metadata)"
        elif weight.name in tables:
            reason = "embedding table (it also feeds a Gather)"
        else:
            reason = _size_reason(weight.shape, weight.axis, pattern)
        layers.append(_measure(weight.name, values, weight.axis, weight.op_type, not reason, reason, pattern))
    return InspectReport(target, "onnx", pattern, layers)


def run_inspect(
    target: str,
    *,
    pattern: str | Pattern | None = None,
    arch: str | None = None,
    trust: bool = False,
    rebuild: bool = False,
    masks_only: bool = False,
    model_class: str = AUTO,
) -> InspectReport:
    """``nmcli inspect``: inspect a checkpoint, any model source, or an ``.onnx`` file.

    A checkpoint is read from its file only (its pruned layers, with numpy: torch is not imported);
    the model is rebuilt from its source, to list the layers a prune left dense too, only with
    ``rebuild`` or ``arch``.

    Args:
        target: an nmcli/1 checkpoint, a model source (see :mod:`nmcli.models.sources`) or an ONNX file.
        pattern: the pattern to check; default the checkpoint's own pattern, else 2:4.
        arch: architecture source for a plain state dict, or to override a checkpoint's source.
        trust: allow unpickling a pickled ``nn.Module``.
        rebuild: rebuild a checkpoint's model from its source.
        masks_only: a sharded checkpoint is measured on its masks only (its weights not read).
        model_class: ``--model-class``: the class of an ``hf:`` target or ``arch``; a checkpoint records
            its own, which this may only repeat (without ``arch``).

    Raises:
        InputError: a bad pattern, a missing, empty or unreadable target, a ``model_class`` that
            contradicts a checkpoint or that no ``hf:`` source takes (and the source errors of
            :func:`nmcli.models.sources.load_model`).
        BackendUnavailableError: the package behind the source is missing.
    """
    nm = parse_pattern(pattern) if pattern is not None else None
    kind = classify(target)
    if model_class != AUTO:
        _check_model_class(kind, arch, model_class)
    if kind.form is Form.SHARDED_CHECKPOINT and kind.path is not None and not (rebuild or arch):
        return inspect_sharded(kind.path, nm, target=target, masks_only=masks_only)
    report = _run_inspect(kind, nm, arch=arch, trust=trust, rebuild=rebuild, model_class=model_class)
    if masks_only:
        report.notes.append("--masks-only applies to sharded checkpoint directories only: it changed nothing here")
    return report


def _check_model_class(kind: InputKind, arch: str | None, model_class: str) -> None:
    """Refuse ``--model-class`` before anything is read, without torch: a checkpoint (without ``arch``)
    whose recorded class it contradicts, or a target that is neither one nor ``hf:`` with no ``hf:`` arch."""
    if kind.is_checkpoint and kind.path is not None and not arch:
        with open_checkpoint(kind, numpy=True) as reader:
            if reader.meta is not None:
                check_recorded_class(kind.spec, reader.meta.source, model_class)
    elif not kind.is_checkpoint and kind.prefix != "hf:" and not (arch or "").startswith("hf:"):
        raise not_an_hf_source(kind.spec, model_class)


def _run_inspect(
    kind: InputKind, nm: Pattern | None, *, arch: str | None, trust: bool, rebuild: bool, model_class: str = AUTO
) -> InspectReport:
    target, path = kind.spec, kind.path
    if kind.named is Form.ONNX:
        if kind.is_directory:
            raise InputError(f"{target} is a directory, not an ONNX file: give the .onnx file inside it")
        if kind.form is not Form.ONNX or path is None:
            raise InputError(f"{target} does not exist: check the path")
        if path.stat().st_size == 0:
            raise InputError(f"{target} is empty (0 bytes), not an ONNX model: re-export it")
        from nmcli.formats.onnx_layout import load_onnx

        proto = load_onnx(path)
        if not proto.graph.node:
            raise InputError(f"{target} holds no ONNX graph (no nodes): it is not a model; re-export it")
        return inspect_onnx(proto, nm or TENSOR_CORE_PATTERN, target=target)
    if kind.form in (Form.CHECKPOINT, Form.COMPRESSED) and path is not None:
        with open_checkpoint(kind, numpy=True) as reader:
            meta = reader.meta
        assert meta is not None  # an nmcli file, by its header
        if not (rebuild or arch):  # a CI gate on checkpoints reads the file only, without torch
            return inspect_checkpoint_file(path, nm, target=target)
        report = _run_checkpoint(
            path, meta, nm, arch=arch, trust=trust, rebuild=rebuild, target=target, model_class=model_class
        )
        report.integrity = file_integrity(path)
        return report

    if arch is None and is_bare_state_dict(target):  # a training checkpoint or state dict: layers inferred
        inferred = infer_state_dict_layers(target, pattern=nm, trust=trust)
        tensors, nm = inferred.state.tensors, inferred.pattern
        layers = [
            _measure(c.param, tensors[c.param], c.axis, c.kind, c.eligible, c.reason, nm)
            for c in inferred.candidates
            if len(c.shape) >= 2
        ]
        return InspectReport(target, "inferred", nm, layers, inferred.notes)
    from nmcli.models.sources import load_model

    loaded = load_model(target, arch=arch, trust=trust, model_class=model_class)
    nm = nm or (loaded.checkpoint.meta.pattern if loaded.checkpoint else None) or TENSOR_CORE_PATTERN
    if loaded.checkpoint is not None:
        report = inspect_checkpoint(loaded.checkpoint, nm, model=loaded.model, target=target)
        if kind.form is Form.SHARDED_CHECKPOINT and path is not None:  # --rebuild or --arch: loaded whole
            report.integrity = file_integrity(path)
        return report
    return inspect_model(loaded.model, nm, target=target, kind=loaded.kind)


def _run_checkpoint(
    path: str | os.PathLike[str],
    meta: CheckpointMeta,
    nm: Pattern | None,
    *,
    arch: str | None,
    trust: bool,
    rebuild: bool = False,
    target: str = "",
    model_class: str = AUTO,
) -> InspectReport:
    """Inspect the checkpoint file ``path`` loaded whole, rebuilt with ``rebuild`` or ``arch``; ``target`` names it."""
    from nmcli.models.sources import model_from_checkpoint

    nm = nm or meta.pattern or TENSOR_CORE_PATTERN
    target = target or str(path)
    ckpt = load_checkpoint(path, dense=False)
    notes: list[str] = []
    model: nn.Module | None = None
    if not (rebuild or arch):
        return inspect_checkpoint(ckpt, nm, target=target)
    try:
        model = model_from_checkpoint(ckpt, arch=arch, trust=trust, model_class=model_class)
    except TrustRequiredError:
        raise  # --rebuild of a recorded py:/pickled source: the refusal names --trust and --arch
    except (SourceError, BackendUnavailableError) as exc:
        if arch:
            raise
        notes.append(
            f"the architecture could not be rebuilt ({exc}); only the pruned layers are listed: "
            "pass --arch SPEC to list the others"
        )
    report = inspect_checkpoint(ckpt, nm, model=model, target=target)
    report.notes.extend(notes)
    return report

"""Streamed pruning of sharded HF directories: tensor by tensor (magnitude) or block by block (calibrated)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nmcli.errors import CheckpointError, InputError, SourceError
from nmcli.formats.checkpoint import (
    DENSE_PREFIX,
    MASK_PREFIX,
    Checkpoint,
    CheckpointMeta,
    LayerEntry,
    raise_problems,
    validate_checkpoint,
)
from nmcli.formats.safetensors import safetensors_header
from nmcli.nm.bits import pack_mask

if TYPE_CHECKING:
    import torch
    from torch import nn

    from nmcli.algorithms.config import CalibrationConfig
    from nmcli.formats.checkpoint import SourceRef
    from nmcli.models.data import Batch
    from nmcli.models.layers import LayerCandidate
    from nmcli.nm.pattern import Pattern
    from nmcli.pipelines.inmemory import LayerReport, PruneResult
from nmcli.formats import rawio
from nmcli.formats.checkpoint import SourceRef, history_record
from nmcli.formats.rawio import SequentialFile, ShardStream
from nmcli.formats.safetensors import TensorInfo, sha256_file, torch_dtype
from nmcli.formats.sharded import (
    LAYOUT,
    SIDECAR,
    OutputShards,
    ShardedModel,
    ShardReader,
    SidecarWriter,
    atomic_directory,
    copy_side_files,
    raw_bytes,
    sidecar_metadata,
    write_index,
)
from nmcli.models.layers import LayerCandidate, find_layers
from nmcli.models.skeleton import build_skeleton, file_keys
from nmcli.nm.bits import exactly_n
from nmcli.nm.masks import KEY_TYPES, TopNSelector, apply_mask, count_kept, l1_norm, nm_mask
from nmcli.progress import ByteProgress, ProgressCallback


@dataclass
class _Plan:
    source: ShardedModel
    model: nn.Module
    candidates: list[LayerCandidate]
    keys: dict[str, str]  # model name -> file name
    eligible: dict[str, LayerCandidate]  # file name -> candidate


def _plan(
    folder: Path, pattern: Pattern, include: Sequence[str], exclude: Sequence[str], skeleton: nn.Module | None = None
) -> _Plan:

    source = ShardedModel.open(folder)
    model = skeleton if skeleton is not None else build_skeleton(folder)
    keys = file_keys(model, source.tensors)
    missing = [n for n, _ in model.named_parameters() if n not in keys]
    if missing:
        raise SourceError(
            f"{folder}: the weights do not fit the architecture of its config.json (missing "
            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): re-save the model with save_pretrained"
        )
    candidates = []
    eligible: dict[str, LayerCandidate] = {}
    for cand in find_layers(model, pattern, include, exclude):
        if cand.eligible and (cand.param not in keys or keys[cand.param] in eligible):
            cand = LayerCandidate(
                cand.module, cand.param, cand.kind, cand.shape, cand.axis, False, "tied to another weight, left dense"
            )
        if cand.eligible:
            info = source.tensors[keys[cand.param]]
            if info.shape != cand.shape:
                raise SourceError(f"{folder}: {info.name} has shape {info.shape}, the architecture says {cand.shape}")
            eligible[keys[cand.param]] = cand
        candidates.append(cand)
    return _Plan(source, model, candidates, keys, eligible)


def _no_layer_error(spec: str, pattern: Pattern, candidates: Sequence[LayerCandidate]) -> InputError:
    reasons = "; ".join(sorted({c.reason for c in candidates})) or "it has no Linear, Conv or attention layers"
    return InputError(f"no layer of {spec} can be pruned to {pattern}: {reasons}")


def prune_directory(
    spec: str,
    folder: Path,
    out: Path,
    pattern: Pattern,
    *,
    source: SourceRef,
    method: str = "magnitude",
    calibration: CalibrationConfig | None = None,
    batches: Sequence[Batch] | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    keep_dense: bool = False,
    input_spec: str | None = None,
    history_args: dict[str, Any] | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
    skeleton: nn.Module | None = None,
) -> PruneResult:
    """Prune the HF directory ``folder`` into the sharded checkpoint directory ``out`` without loading it whole.

    ``skeleton`` is the caller's :func:`build_skeleton` of ``folder``, when it has built one already.

    Magnitude reads, prunes and writes one tensor at a time, and hashes every shard on the same
    read; wanda and sparsegpt (``batches``) go block by block (:func:`_calibrated`). Masks and
    effective weights equal those of the in-memory path.

    Raises:
        InputError: nothing can be pruned; a calibrated method on a model without repeated blocks or
            with BatchNorm (those are loaded whole: ``-o FILE.safetensors``).
        SourceError/CheckpointError: unreadable or inconsistent inputs.
        OutputExistsError: ``out`` exists without ``force``, or is an input.
    """
    from nmcli.pipelines.inmemory import PruneResult

    if (batches is None) != (method == "magnitude"):
        raise InputError(f"--method {method} on {spec}: calibration batches are needed for wanda and sparsegpt only")
    plan = _plan(folder, pattern, include, exclude, skeleton)
    if not plan.eligible:
        raise _no_layer_error(spec, pattern, plan.candidates)
    outcomes: dict[str, _Outcome] = {}
    notes: list[str] = []
    with atomic_directory(out, force=force, inputs=[folder]) as tmp:
        copy_side_files(folder, tmp)
        shards = OutputShards(plan.source, tmp) if batches is not None else None
        sidecar = SidecarWriter(tmp / SIDECAR, reserve=16384 + 1024 * len(plan.candidates))
        try:
            if shards is not None and batches is not None:
                from nmcli.algorithms.config import CalibrationConfig

                cfg = calibration or CalibrationConfig(spec="")
                hashes = _calibrated(
                    plan, pattern, method, cfg, batches, shards, sidecar, keep_dense, outcomes, notes, progress
                )
                shards.finish()
            else:
                hashes = _magnitude(plan, pattern, tmp, sidecar, keep_dense, outcomes, progress)
            write_index(plan.source, tmp)
            reports, entries, pruned = _layer_reports(plan, pattern, outcomes)
            params_total = sum(p.numel() for p in plan.model.parameters())
            samples = sum(b.size for b in batches) if batches is not None else 0
            metrics = _metrics(reports, len(entries), pruned, params_total, samples if batches is not None else None)
            from dataclasses import replace

            ref = replace(source, shards=tuple((f, hashes[f]) for f in plan.source.files))
            meta = CheckpointMeta(
                source=ref,
                pattern=pattern,
                layers=entries,
                input_spec=input_spec,
                history=[history_record("prune", history_args or {"pattern": str(pattern), "method": method}, metrics)],
                method=method,
            )
            sidecar.finish(sidecar_metadata(meta))
        finally:
            if shards is not None:
                shards.close()
            sidecar.close()
    ckpt = Checkpoint(tensors={}, masks={}, meta=meta)
    result = PruneResult(ckpt, pattern, method, reports, params_total, pruned, out, notes, False, samples)
    result.calibration_path = "blocks" if batches is not None else ""  # the streamed prune only chains blocks
    return result


def _layer_reports(
    plan: _Plan, pattern: Pattern, outcomes: Mapping[str, _Outcome]
) -> tuple[list[LayerReport], list[LayerEntry], int]:
    """The report of every candidate, the checkpoint entries of the pruned ones, and the weights they zeroed."""
    from nmcli.pipelines.inmemory import LayerReport

    reports, entries, pruned = [], [], 0
    for cand in plan.candidates:
        if not cand.eligible:
            reports.append(LayerReport(cand.module, cand.param, cand.shape, "skipped", cand.reason, None))
            continue
        key = plan.keys[cand.param]
        o = outcomes[key]
        pruned += o.pruned
        entries.append(LayerEntry(key, cand.module, pattern.n, pattern.m, cand.axis, cand.shape))
        reports.append(LayerReport(cand.module, key, cand.shape, "pruned", "", o.kept, o.recon_error, o.note))
    return reports, entries, pruned


def _metrics(
    reports: Sequence[LayerReport], layers: int, pruned: int, params_total: int, calib_samples: int | None
) -> dict[str, Any]:
    """The headline metrics of the prune's history record (``calib_samples`` None: magnitude, uncalibrated)."""
    metrics: dict[str, Any] = {
        "layers_pruned": layers,
        "params_pruned": pruned,
        "sparsity": pruned / params_total if params_total else 0.0,
        "layout": LAYOUT,
    }
    if calib_samples is not None:
        errors = [r.recon_error for r in reports if r.recon_error is not None]
        metrics.update(
            {
                "calib_samples": calib_samples,
                "mean_recon_error": sum(errors) / len(errors) if errors else None,
            }
        )
    return metrics


@dataclass
class _Outcome:
    kept: float
    pruned: int
    recon_error: float | None = None
    note: str = ""


def _l1(value: torch.Tensor) -> float:

    return l1_norm(value)


def finish_layer(
    name: str,
    cand: LayerCandidate,
    pattern: Pattern,
    original: torch.Tensor,
    effective: torch.Tensor,
    mask: torch.Tensor,
    dense: torch.Tensor | None,
    sidecar: SidecarWriter,
    outcomes: dict[str, _Outcome],
    *,
    recon_error: float | None = None,
    note: str = "",
) -> None:
    """Validate one pruned layer with the format's own checks and spool its packed mask (and dense weights)."""
    entry = LayerEntry(name, cand.module, pattern.n, pattern.m, cand.axis, cand.shape)
    packed = pack_mask(mask)

    one = CheckpointMeta(source=SourceRef(spec=""), layers=[entry])
    raise_problems(name, validate_checkpoint({name: effective}, {name: packed}, {}, one))
    sidecar.add(MASK_PREFIX + name, packed)
    if dense is not None:
        sidecar.add(DENSE_PREFIX + name, dense)
    total = _l1(original)
    kept = _l1(effective) / total if total > 0 else 1.0

    outcomes[name] = _Outcome(kept, int(mask.numel()) - count_kept(mask), recon_error, note)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """One torch thread inside: the reading thread has the other core (measured on 2 cores: 3.0 s
    against 4.4 s with two torch threads for 1.3 GB; OpenMP ops slow down badly on a busy core)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _magnitude(
    plan: _Plan,
    pattern: Pattern,
    folder: Path,
    sidecar: SidecarWriter,
    keep_dense: bool,
    outcomes: dict[str, _Outcome],
    progress: ProgressCallback | None,
) -> dict[str, str]:
    """Magnitude prune, shard by shard in file order; returns the sha256 of every input shard.

    Each shard is streamed once: tensors in file order, pruned weights in slices of
    groups (:func:`_prune_streamed`), everything written front to back into the output shard of the
    same name (:class:`SequentialFile`), while :class:`ShardStream` reads and hashes the file on
    another thread. Memory stays at the read pieces plus one layer's packed mask, whatever the shard's size.
    """

    source = plan.source
    bar = ByteProgress(progress, source.total_bytes)
    hashes: dict[str, str] = {}
    with _one_torch_thread():
        for number, file in enumerate(source.files, 1):
            header = source.headers[file]
            stream = ShardStream(source.folder / file)
            writer: SequentialFile | None = None
            try:
                writer = SequentialFile(folder / file)
                entries = [(t.name, t.dtype, t.shape, t.nbytes) for t in header.tensors]
                writer.write(safetensors_header(entries, header.metadata))
                stream.skip(len(header.raw))
                position = 0  # in the data section
                for info in header.tensors:
                    stream.skip(info.begin - position)  # a gap some writers leave
                    position = info.end
                    cand = plan.eligible.get(info.name)
                    if cand is None:
                        for start in range(0, info.nbytes, rawio.STREAM_PIECE):
                            writer.write(stream.take(min(rawio.STREAM_PIECE, info.nbytes - start)))
                    else:
                        dtype = torch_dtype(info.dtype)
                        _prune_streamed(info, cand, dtype, stream, pattern, writer, sidecar, keep_dense, outcomes)
                    bar.advance(info.nbytes, f"shard {number}/{len(source.files)}")
                writer.finish()
                hashes[file] = stream.hexdigest()
            except BaseException:
                stream.cancel()
                raise
            finally:
                if writer is not None:
                    writer.close()
    return hashes


def _prune_streamed(
    info: TensorInfo,
    cand: LayerCandidate,
    dtype: torch.dtype,
    stream: ShardStream,
    pattern: Pattern,
    writer: SequentialFile,
    sidecar: SidecarWriter,
    keep_dense: bool,
    outcomes: dict[str, _Outcome],
) -> None:
    """Prune one weight as its bytes come from ``stream`` and write its effective bytes to ``writer``.

    Groups along the last axis (Linear weights) go in slices of ``STREAM_GROUPS`` groups: the mask
    of :class:`nmcli.nm.masks.TopNSelector`, effective weights as bits times the mask (computed
    into the writer's staging buffer), the packed mask slice by slice (slices hold a multiple of 8
    weights), L1 sums in float64 across slices, ``--keep-dense`` bytes appended to the sidecar as
    they pass. The packed mask is then checked against the N:M rule (exactly ``n`` kept in every
    group). Other layouts (convs, GPT-2 Conv1D) and dtypes are read whole and take the in-memory path.
    """
    import torch

    name, shape, (n, m) = info.name, tuple(cand.shape), (pattern.n, pattern.m)
    axis = cand.axis % len(shape)
    dtype_name = str(dtype).removeprefix("torch.")
    if axis != len(shape) - 1 or dtype_name not in KEY_TYPES or shape[-1] % m:
        weight = torch.frombuffer(stream.take(info.nbytes), dtype=dtype).reshape(shape)
        mask = nm_mask(weight, pattern, axis)
        effective = apply_mask(weight, mask)
        finish_layer(name, cand, pattern, weight, effective, mask, weight if keep_dense else None, sidecar, outcomes)
        writer.write(raw_bytes(effective))
        return
    bits = getattr(torch, KEY_TYPES[dtype_name][0])
    size_of = torch.empty((), dtype=dtype).element_size()
    count = info.nbytes // size_of // m  # groups
    step = min(rawio.STREAM_GROUPS, max(count, 1))  # read at call time: tests shrink it
    select = TopNSelector(pattern, dtype, "cpu", step)
    keep = torch.empty(step, m, dtype=torch.bool)
    effective_bits = torch.empty(step, m, dtype=bits)
    packed = np.empty((count * m + 7) // 8, dtype=np.uint8)
    total = kept = 0.0
    if keep_dense:
        sidecar.begin(DENSE_PREFIX + name, dtype, shape)
    for start in range(0, count, step):
        size = min(step, count - start)
        nbytes = size * m * size_of
        raw = stream.take(nbytes)
        part = torch.frombuffer(raw, dtype=dtype).view(size, m)
        part_keep, part_bits = keep[:size], effective_bits[:size]
        select(part, out=part_keep)
        staged = writer.reserve(nbytes, size_of)
        if staged is not None:  # the effective bits go straight into the output's staging buffer
            part_bits = torch.frombuffer(staged, dtype=bits).view(size, m)
        torch.mul(part.view(bits), part_keep, out=part_bits)
        if staged is not None:
            writer.commit(nbytes)
        else:
            writer.write(part_bits.numpy())
        if keep_dense:
            sidecar.extend(raw)
        first = start * m // 8
        piece = np.packbits(part_keep.numpy().reshape(-1), bitorder="little")
        packed[first : first + piece.size] = piece
        total += float(part.abs().sum(dtype=torch.float32))
        kept += float(part_bits.view(dtype).abs().sum(dtype=torch.float32))
        del part, raw, staged
    if keep_dense:
        sidecar.end()
    if not exactly_n(packed, shape, axis, n, m):
        raise CheckpointError(f"tensor {name}: the streamed mask does not keep exactly {n} of every {m} (a bug)")
    kept_count = count * n
    sidecar.add(MASK_PREFIX + name, torch.from_numpy(packed))
    outcomes[name] = _Outcome(kept / total if total > 0 else 1.0, count * m - kept_count)


_Slot = tuple["nn.Module", str, bool, str]  # (module, attribute, is a parameter, full model name)


def _slots(model: nn.Module, blocks: Sequence[str]) -> tuple[dict[str, list[_Slot]], list[_Slot]]:
    """Every parameter and buffer attribute of ``model``: per block, and those outside the blocks."""
    inside: dict[str, list[_Slot]] = {b: [] for b in blocks}
    outside: list[_Slot] = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        owner = next((b for b in blocks if module_name == b or module_name.startswith(b + ".")), None)
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for attr, value in table.items():
                if value is None:
                    continue
                slot = (module, attr, is_param, f"{module_name}.{attr}" if module_name else attr)
                (inside[owner] if owner is not None else outside).append(slot)
    return inside, outside


class _StreamedBlocks:
    """The :class:`nmcli.pipelines.blocks.BlockIO` of a sharded prune: blocks materialized from the input shards,
    written into the output shards (masks into the sidecar) and sent back to the meta device."""

    def __init__(
        self,
        plan: _Plan,
        pattern: Pattern,
        reader: ShardReader,
        shards: OutputShards,
        sidecar: SidecarWriter,
        keep_dense: bool,
        outcomes: dict[str, _Outcome],
        device: str,
        bar: ByteProgress,
        blocks: dict[str, list[_Slot]],
    ) -> None:
        self.plan, self.pattern, self.reader, self.shards, self.sidecar = plan, pattern, reader, shards, sidecar
        self.keep_dense, self.outcomes, self.device, self.bar, self.blocks = keep_dense, outcomes, device, bar, blocks
        self.written: set[str] = set()

    def materialize(self, slots: Sequence[_Slot]) -> None:
        """Read the slots' tensors from the shards (in the files' dtype); tied parameters stay tied."""
        from torch import nn

        made: dict[int, Any] = {}
        for module, attr, is_param, full in slots:
            table: dict[str, Any] = module._parameters if is_param else module._buffers
            old = table[attr]
            assert old is not None
            if id(old) in made:
                table[attr] = made[id(old)]
                continue
            key = self.plan.keys.get(full)
            if key is None:
                if is_param:
                    raise CheckpointError(f"parameter {full} is in no shard (a bug: the plan checks this)")
                if old.device.type != "meta":  # a buffer the files do not hold, computed at construction
                    table[attr] = made[id(old)] = old.to(self.device)
                continue
            # a copy: the pruner writes into it, and the map must keep the originals (kept |w|, --keep-dense)
            value = self.reader.tensor(key).to(self.device, copy=True)
            new = nn.Parameter(value, requires_grad=old.requires_grad) if is_param else value
            table[attr] = made[id(old)] = new

    def write(self, slots: Sequence[_Slot], layer_outcomes: Mapping[str, Any]) -> int:
        """Write the slots' final tensors (pruned layers: effective weights, masks to the sidecar); returns bytes."""
        import torch

        nbytes = 0
        for module, attr, is_param, full in slots:
            key = self.plan.keys.get(full)
            if key is None or key in self.written:
                continue
            table = module._parameters if is_param else module._buffers
            value = table[attr]
            assert value is not None
            value = value.detach()
            cand = self.plan.eligible.get(key)
            if cand is not None:
                outcome = layer_outcomes[cand.param]
                original = self.reader.tensor(key)
                mask = outcome.mask.to("cpu")
                effective = value.to("cpu")
                dense = torch.where(mask, effective, original) if self.keep_dense else None
                finish_layer(
                    key, cand, self.pattern, original, effective, mask, dense, self.sidecar, self.outcomes,
                    recon_error=outcome.recon_error, note=outcome.note,
                )  # fmt: skip
                # the block is freed next: the outcome keeps no reference to its tensors
                outcome.mask = outcome.weight = torch.empty(0)
                del original, dense
            self.shards.put(key, value)
            self.written.add(key)
            nbytes += self.plan.source.tensors[key].nbytes
        return nbytes

    @staticmethod
    def free(slots: Sequence[_Slot]) -> None:
        """Send the slots' tensors back to the meta device (buffers the files do not hold stay)."""
        from torch import nn

        made: dict[int, Any] = {}
        for module, attr, is_param, _ in slots:
            table = module._parameters if is_param else module._buffers
            old = table[attr]
            assert old is not None
            if old.device.type == "meta":
                continue
            if id(old) not in made:
                meta = old.detach().to("meta")
                made[id(old)] = nn.Parameter(meta, requires_grad=old.requires_grad) if is_param else meta
            table[attr] = made[id(old)]

    def load(self, block: str) -> None:
        self.materialize(self.blocks[block])

    def done(self, block: str, outcomes: Mapping[str, Any]) -> None:
        slots = self.blocks[block]
        nbytes = self.write(slots, outcomes)
        self.free([s for s in slots if s[3] in self.plan.keys or s[2]])
        number = list(self.blocks).index(block) + 1
        self.bar.advance(nbytes, f"block {number}/{len(self.blocks)}")


def _calibrated(
    plan: _Plan,
    pattern: Pattern,
    method: str,
    cfg: CalibrationConfig,
    batches: Sequence[Batch],
    shards: OutputShards,
    sidecar: SidecarWriter,
    keep_dense: bool,
    outcomes: dict[str, _Outcome],
    notes: list[str],
    progress: ProgressCallback | None,
) -> dict[str, str]:
    """Wanda/SparseGPT block by block from the shards (:func:`nmcli.pipelines.blocks.prune_calibrated` with a BlockIO).

    Everything outside the blocks (embeddings, rotary buffers, final norm, heads) is materialized
    for the whole run; one block at a time besides. Returns the sha256 of every input shard.
    """
    from nmcli.models.batchnorm import has_batchnorm
    from nmcli.pipelines.blocks import find_blocks, prune_calibrated

    model = plan.model
    layers = [c for c in plan.candidates if c.eligible]
    found = find_blocks(model, layers)
    if found is None or has_batchnorm(model):
        why = "it has BatchNorm layers" if found is not None else "it has no repeated blocks"
        raise InputError(
            f"{plan.source.folder} cannot be calibrated block by block from its shards ({why}): "
            "load it whole instead (give -o FILE.safetensors)"
        )
    inside, outside = _slots(model, found[1])
    bar = ByteProgress(progress, plan.source.total_bytes)
    with ShardReader(plan.source) as reader:
        io = _StreamedBlocks(plan, pattern, reader, shards, sidecar, keep_dense, outcomes, cfg.device, bar, inside)
        io.materialize(outside)
        try:
            result = prune_calibrated(model, layers, pattern, method, batches, cfg, None, block_io=io)
            bar.advance(io.write(outside, result.outcomes), "outside the blocks")
        finally:
            io.free(outside)
            for slots in inside.values():
                io.free(slots)
        for name in plan.source.tensors:  # tensors the architecture does not name: copied as they are
            if name not in io.written:
                shards.put(name, reader.tensor(name))
    notes.extend(result.notes)
    notes.append(
        f"streamed from {len(plan.source.files)} shard(s): one block of {found[0]} in memory at a time, "
        "the layers outside the blocks on passes that replay the last block's outputs"
    )
    return {f: sha256_file(plan.source.folder / f) for f in plan.source.files}

"""Calibrated pruning block by block: each block's inputs come from the already-pruned blocks before it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from nmcli.algorithms.config import CalibrationConfig, LayerOutcome
from nmcli.algorithms.solve import solve_layer
from nmcli.algorithms.statistics import Collector
from nmcli.errors import DataError, InputError
from nmcli.memory import map_large_allocations, trim_heap
from nmcli.models.batchnorm import has_batchnorm, model_call_kwargs, recalibrate_batchnorm
from nmcli.models.data import Batch, check_batch_fits, load_data
from nmcli.models.layers import LayerCandidate
from nmcli.nm.pattern import Pattern
from nmcli.progress import ProgressCallback


@dataclass
class OneShotResult:
    """Per-parameter outcomes of a calibrated prune, and notes for the summary."""

    outcomes: dict[str, LayerOutcome] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    bn_recalibrated: bool = False


class BlockIO(Protocol):
    """Where the blocks' weights live when the model is not in memory (:mod:`nmcli.formats.sharded`).

    With a ``BlockIO`` the blocks start on the meta device: :meth:`load` materializes one block's
    weights before it is calibrated, :meth:`done` writes its pruned weights (``outcomes`` holds the
    masks of every layer pruned so far) and frees it again. Everything outside the blocks must be
    materialized by the caller; layers outside the blocks are pruned on passes of the model whose
    blocks replay the last block's outputs.
    """

    def load(self, block: str) -> None: ...

    def done(self, block: str, outcomes: Mapping[str, LayerOutcome]) -> None: ...


def calibration_batches(
    cfg: CalibrationConfig,
    *,
    source_spec: str,
    input_shape: Sequence[int] | None,
) -> list[Batch]:
    """The first ``cfg.samples`` examples of a seeded shuffle of ``cfg.spec``, in batches (targets dropped).

    Raises:
        DataError: the spec is unreadable or holds no examples.
    """
    try:
        data = load_data(cfg.spec, source_spec=source_spec, input_shape=input_shape, max_length=cfg.max_length)
    except DataError as exc:
        raise DataError(str(exc).replace("--data", "--calib", 1)) from exc
    batches: list[Batch] = []
    if data.map_style:
        n = len(data)
        if n == 0:
            raise DataError(f"--calib {cfg.spec} holds no examples")
        generator = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(n, generator=generator)[: cfg.samples].tolist()
        for start in range(0, len(order), cfg.batch_size):
            batches.append(_without_targets(data.take(order[start : start + cfg.batch_size])))
        return batches
    taken = 0
    for batch in data.iter_batches():
        batch = _without_targets(batch)
        room = cfg.samples - taken
        if batch.size > room:
            batch = Batch(tuple(a[:room] for a in batch.args), {k: v[:room] for k, v in batch.kwargs.items()})
        batches.append(batch)
        taken += batch.size
        if taken >= cfg.samples:
            break
    if not batches:
        raise DataError(f"--calib {cfg.spec} produced no batches")
    return batches


def _without_targets(batch: Batch) -> Batch:
    kwargs = {k: v for k, v in batch.kwargs.items() if k != "labels"}
    return Batch(batch.args, kwargs, None)


def find_blocks(model: nn.Module, layers: Sequence[LayerCandidate]) -> tuple[str, list[str]] | None:
    """The model's repeated blocks: the ``nn.ModuleList`` of same-class modules holding the most prunable layers.

    Returns ``(list_name, [block names])``, or None when the model has no such list.
    """
    best: tuple[int, str, list[str]] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        names = [f"{name}.{i}" if name else str(i) for i in range(len(module))]
        covered = sum(1 for cand in layers if any(_inside(cand.module, block) for block in names))
        if covered and (best is None or covered > best[0]):
            best = (covered, name, names)
    return None if best is None else (best[1], best[2])


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def find_stages(model: nn.Module, layers: Sequence[LayerCandidate]) -> list[str]:
    """Module names to prune one after another when the model has no repeated blocks.

    Containers (Sequential, ModuleList, ModuleDict), and the model itself, are opened up; every
    other module holding a prunable layer is one stage (a residual block, a conv, a Linear).
    """
    stages: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if not any(_inside(cand.module, name) for cand in layers):
                continue
            if isinstance(child, _CONTAINERS):
                visit(name, child)
            else:
                stages.append(name)

    visit("", model)
    # layers held directly by the model object (not in a child) form a last stage
    if any(cand.module == "" for cand in layers):
        stages.append("")
    return stages


def _inside(module_name: str, block: str) -> bool:
    return block == "" or module_name == block or module_name.startswith(block + ".")


def _run(model: nn.Module, batch: Batch, collector: Collector | None, extra: dict[str, Any]) -> Any:
    if collector is not None:
        collector.token_mask = batch.kwargs.get("attention_mask")
    return model(*batch.args, **batch.kwargs, **extra)


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


@dataclass
class _BlockInput:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    token_mask: torch.Tensor | None


def _capture_block_inputs(model: nn.Module, block: nn.Module, batches: Sequence[Batch]) -> list[_BlockInput]:
    captured: list[_BlockInput] = []
    current: dict[str, Any] = {}

    def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(_BlockInput(args, dict(kwargs), current.get("mask")))
        raise _StopForward

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    extra = model_call_kwargs(model)
    try:
        for batch in batches:
            current["mask"] = batch.kwargs.get("attention_mask")
            try:
                model(*batch.args, **batch.kwargs, **extra)
            except _StopForward:
                continue
    finally:
        handle.remove()
    return captured


def _primary_output(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    value = getattr(out, "last_hidden_state", None)
    return value if isinstance(value, torch.Tensor) else None


def _next_input(inp: _BlockInput, hidden: torch.Tensor) -> _BlockInput:
    if inp.args:
        return _BlockInput((hidden, *inp.args[1:]), inp.kwargs, inp.token_mask)
    kwargs = dict(inp.kwargs)
    kwargs["hidden_states"] = hidden
    return _BlockInput((), kwargs, inp.token_mask)


class _Pruner:
    """Prunes groups of layers from collected statistics and writes the results into the model."""

    def __init__(
        self,
        model: nn.Module,
        pattern: Pattern,
        method: str,
        cfg: CalibrationConfig,
        total: int,
        progress: ProgressCallback | None,
    ) -> None:
        self.model, self.pattern, self.method, self.cfg = model, pattern, method, cfg
        self.total, self.progress = total, progress
        self.result = OneShotResult()

    def prune(self, layers: Sequence[LayerCandidate], collector: Collector) -> None:
        for cand in layers:
            param = self.model.get_parameter(cand.param)  # looked up now: a BlockIO replaces a block's parameters
            outcome = solve_layer(
                param.detach(), cand, collector.segments.get(cand.param, []), self.pattern, self.method, self.cfg
            )
            with torch.no_grad():
                param.copy_(torch.where(outcome.mask.to(param.device), outcome.weight.to(param.device), 0))
            # the effective weight now lives in the model: no second copy of it is kept
            outcome.mask, outcome.weight = outcome.mask.cpu(), param.detach()
            self.result.outcomes[cand.param] = outcome
            if self.progress is not None:
                self.progress(len(self.result.outcomes), self.total, cand.param)


def prune_calibrated(
    model: nn.Module,
    layers: Sequence[LayerCandidate],
    pattern: Pattern,
    method: str,
    batches: Sequence[Batch],
    cfg: CalibrationConfig,
    progress: ProgressCallback | None = None,
    block_io: BlockIO | None = None,
) -> OneShotResult:
    """Prune ``layers`` of ``model`` in place with a calibrated method, block by block with error propagation.

    Args:
        model: the dense model (eval mode); its pruned weights are overwritten with the result.
        layers: the eligible layers to prune.
        pattern: the N:M pattern.
        method: ``sparsegpt``, ``wanda`` or ``magnitude`` (magnitude masks; statistics only for the report).
        batches: the calibration batches.
        cfg: damping, block size, device, BatchNorm recalibration.
        progress: called as ``progress(done, total, param)`` after each layer.
        block_io: the blocks are on the meta device and loaded, written and freed one at a time
            through it (the model must have chainable blocks and no BatchNorm; the model is not moved).

    Returns:
        Per-layer masks, weights and reconstruction errors, and notes on how the model was traversed.

    Raises:
        InputError: with ``block_io``, the model has no blocks that can be chained.
        DataError: the first batch does not fit the model (checked before any layer is pruned).
    """
    device = torch.device(cfg.device)
    was_training = model.training
    model.eval()
    if block_io is None:
        model.to(device)
    if block_io is not None:  # the streamed prune's memory is the point of streaming
        map_large_allocations()
    moved = [b.to(device) for b in batches]
    pruner = _Pruner(model, pattern, method, cfg, len(layers), progress)
    try:
        with torch.no_grad():
            blocks = find_blocks(model, layers)
            if moved:  # streamed blocks are on the meta device: run only as far as the first one
                streamed = blocks is not None and block_io is not None
                first = dict(model.named_modules())[blocks[1][0]] if streamed and blocks is not None else None
                check_batch_fits(
                    model, moved[0], f"--calib {cfg.spec}", extra=model_call_kwargs(model), stop_before=first
                )
            done: set[str] = set()
            outputs: list[Any] | None = [] if block_io is not None else None
            if blocks is not None and _prune_blocks(model, blocks[1], layers, moved, pruner, done, block_io, outputs):
                pruner.result.notes.append(
                    f"{method}: calibrated block by block over the {len(blocks[1])} blocks of {blocks[0]}, "
                    f"each block's inputs produced by the pruned blocks before it"
                )
            elif block_io is not None:
                raise InputError(
                    "the model has no repeated blocks whose inputs can be captured and chained, so it cannot be "
                    "calibrated block by block from its shards: load it whole (give -o FILE.safetensors)"
                )
            rest = [cand for cand in layers if cand.param not in done]
            if rest and block_io is not None and blocks is not None and outputs is not None:
                with _replaying(model, blocks[0], outputs, moved):
                    _prune_stages(model, rest, moved, pruner, done, cfg)
            elif rest:
                _prune_stages(model, rest, moved, pruner, done, cfg)
            if block_io is None and cfg.bn_recalibrate and has_batchnorm(model):
                recalibrate_batchnorm(model, moved)
                pruner.result.bn_recalibrated = True
    finally:
        if block_io is None:
            model.to("cpu")
        model.train(was_training)
    return pruner.result


class _Replay(nn.Module):
    """Stands in for every block on the final passes of a streamed prune: returns the last block's output."""

    def __init__(self, outputs: Sequence[Any]) -> None:
        super().__init__()
        self.outputs = outputs
        self.index = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.outputs[self.index]


def _first_tensor(args: Sequence[Any], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


@contextlib.contextmanager
def _replaying(model: nn.Module, list_name: str, outputs: Sequence[Any], batches: Sequence[Batch]) -> Iterator[None]:
    """The blocks of ``list_name`` replaced by :class:`_Replay`; each call of the model on one of ``batches``
    replays that batch's output of the last (pruned) block, so the layers after the blocks see exactly
    what they would see on the pruned model, with no block in memory."""
    container = model.get_submodule(list_name)
    assert isinstance(container, nn.ModuleList)
    originals = list(container)
    replay = _Replay(outputs)
    firsts = [_first_tensor(b.args, b.kwargs) for b in batches]

    def pick(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        first = _first_tensor(args, kwargs)
        matches = [i for i, f in enumerate(firsts) if f is first]
        if not matches:
            raise InputError("a pass of the model on inputs other than the calibration batches (a bug)")
        replay.index = matches[0]

    for i in range(len(container)):
        container[i] = replay
    handle = model.register_forward_pre_hook(pick, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for i, block in enumerate(originals):
            container[i] = block


def _prune_blocks(
    model: nn.Module,
    block_names: list[str],
    layers: Sequence[LayerCandidate],
    batches: Sequence[Batch],
    pruner: _Pruner,
    done: set[str],
    block_io: BlockIO | None = None,
    outputs: list[Any] | None = None,
) -> bool:
    """Block-by-block pruning; False (nothing pruned) when the blocks cannot be chained.

    With ``block_io`` each block is loaded before and written and freed after it is pruned;
    ``outputs``, when given, receives the last block's outputs on every batch.
    """
    modules = dict(model.named_modules())
    inputs = _capture_block_inputs(model, modules[block_names[0]], batches)
    if len(inputs) != len(batches):
        return False
    for name in block_names:
        block = modules[name]
        if block_io is not None:
            block_io.load(name)
        in_block = [cand for cand in layers if _inside(cand.module, name)]
        for group in _sequential_groups(model, block, in_block, inputs[0]):
            collector = Collector(model, group)
            try:
                for inp in inputs:
                    collector.token_mask = inp.token_mask
                    block(*inp.args, **inp.kwargs)
            finally:
                collector.remove()
            pruner.prune(group, collector)
            done.update(cand.param for cand in group)
            del collector
            trim_heap()
        next_inputs = []
        for inp in inputs:
            out = block(*inp.args, **inp.kwargs)
            hidden = _primary_output(out)
            first = inp.args[0] if inp.args else inp.kwargs.get("hidden_states")
            if hidden is None or not isinstance(first, torch.Tensor) or hidden.shape != first.shape:
                raise InputError(
                    f"block {name} does not return its hidden states in the shape it takes them: "
                    "report this model to nmcli"
                )
            next_inputs.append(_next_input(inp, hidden))
            if outputs is not None and name == block_names[-1]:
                outputs.append(out)
            del out
        if block_io is not None:
            block_io.done(name, pruner.result.outcomes)
        inputs = next_inputs
        trim_heap()
    return True


def _sequential_groups(
    model: nn.Module, block: nn.Module, layers: Sequence[LayerCandidate], sample: _BlockInput
) -> list[list[LayerCandidate]]:
    """The block's layers in the order they run, grouped by shared input (q, k and v read the same tensor).

    Each group is pruned before the next one collects its statistics, so the attention output
    projection sees the pruned q/k/v and the MLP's down projection the pruned up projection
    (SparseGPT's "true sequential" order). Layers that never run form a last group.
    """
    modules = dict(model.named_modules())
    seen: list[tuple[str, Any]] = []
    handles = []
    for module_name in dict.fromkeys(cand.module for cand in layers):

        def hook(mod: nn.Module, args: tuple[Any, ...], name: str = module_name) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            key = (x.data_ptr(), tuple(x.shape)) if x is not None else None
            if all(name != done for done, _ in seen):
                seen.append((name, key))

        handles.append(modules[module_name].register_forward_pre_hook(hook))
    try:
        block(*sample.args, **sample.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[LayerCandidate]] = []
    keys: list[Any] = []
    for module_name, key in seen:
        members = [cand for cand in layers if cand.module == module_name]
        if key is not None and keys and keys[-1] == key:
            groups[-1].extend(members)
        else:
            groups.append(members)
            keys.append(key)
    ran = {module_name for module_name, _ in seen}
    rest = [cand for cand in layers if cand.module not in ran]
    return [*groups, rest] if rest else groups


def _prune_stages(
    model: nn.Module,
    layers: Sequence[LayerCandidate],
    batches: Sequence[Batch],
    pruner: _Pruner,
    done: set[str],
    cfg: CalibrationConfig,
) -> None:
    """Stage by stage: one pass of the whole (partly pruned) model per stage, in execution order."""
    stages = _execution_order(model, find_stages(model, layers), batches[0])
    extra = model_call_kwargs(model)
    recalibrate = cfg.bn_recalibrate and has_batchnorm(model)
    for stage in stages:
        in_stage = [cand for cand in layers if _inside(cand.module, stage) and cand.param not in done]
        if not in_stage:
            continue
        collector = Collector(model, in_stage)
        try:
            for batch in batches:
                _run(model, batch, collector, extra)
        finally:
            collector.remove()
        pruner.prune(in_stage, collector)
        done.update(cand.param for cand in in_stage)
        if recalibrate:
            recalibrate_batchnorm(model, batches)
    if pruner.result.notes:
        pruner.result.notes.append(f"{len(layers)} layer(s) outside the blocks pruned on passes of the whole model")
    else:
        pruner.result.notes.append(
            f"{pruner.method}: no repeated blocks found: calibrated stage by stage ({len(stages)} stages, "
            "one pass of the whole partly pruned model each)"
        )


def _execution_order(model: nn.Module, stages: list[str], batch: Batch) -> list[str]:
    """``stages`` sorted by when they first run on ``batch`` (stages that never run keep their place, last)."""
    modules = dict(model.named_modules())
    first_seen: dict[str, int] = {}
    handles = []
    for stage in stages:
        if stage == "":
            continue

        def hook(mod: nn.Module, args: Any, name: str = stage) -> None:
            first_seen.setdefault(name, len(first_seen))

        handles.append(modules[stage].register_forward_pre_hook(hook))
    try:
        model(*batch.args, **batch.kwargs, **model_call_kwargs(model))
    finally:
        for handle in handles:
            handle.remove()
    return sorted(stages, key=lambda s: (s not in first_seen, first_seen.get(s, 0)))

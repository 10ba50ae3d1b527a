"""Calibrated pruning block by block: each block's inputs come from the already-pruned blocks before it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from nmcli.algorithms.config import CalibrationConfig, LayerOutcome
from nmcli.algorithms.parallel import Workers, default_workers
from nmcli.algorithms.solve import solve_layer
from nmcli.algorithms.statistics import Collector
from nmcli.algorithms.threads import torch_threads
from nmcli.errors import DataError, InputError
from nmcli.memory import map_large_allocations, trim_heap
from nmcli.models.batchnorm import has_batchnorm, model_call_kwargs, recalibrate_batchnorm
from nmcli.models.data import Batch, check_batch_fits, load_data
from nmcli.models.layers import LayerCandidate
from nmcli.nm.pattern import Pattern
from nmcli.pipelines.chaining import Slot, chain_slot, get_slot, observe_calls, primary_output, set_slot
from nmcli.pipelines.frozen import FrozenOutputs
from nmcli.progress import ProgressCallback

# How a calibrated prune traversed the model (``PruneResult.calibration_path``, ``--json``).
PATH_BLOCKS = "blocks"  # chained blocks: each block's inputs are the previous pruned block's outputs
PATH_STAGES = "stages"  # stages whose inputs are captured on the partly pruned model
PATH_DENSE = "dense"  # every layer's statistics from one dense forward (no error propagation)


@dataclass
class OneShotResult:
    """Per-parameter outcomes of a calibrated prune, and notes for the summary."""

    outcomes: dict[str, LayerOutcome] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    bn_recalibrated: bool = False
    path: str = ""


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
    by_length: bool = False,
) -> list[Batch]:
    """The first ``cfg.samples`` examples of a seeded shuffle of ``cfg.spec``, in batches (targets dropped).

    With ``by_length``, examples with an attention mask are batched in order of their token count
    (ties in shuffle order): a batch is padded to its longest example, so random batches of
    sentences run about twice the tokens they hold (MiniLM's calibration set: 6128 positions for
    3066 tokens). The statistics are sums over the real tokens, so only the time changes.

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
        if by_length:
            order = _by_length(data, order)
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


def _by_length(data: Any, order: list[int]) -> list[int]:
    """``order`` sorted by each example's token count (its attention mask), ties kept in order; as is without masks."""
    lengths = []
    for index in order:
        mask = data.take([index]).kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor):
            return order
        lengths.append(int(mask.sum()))
    return [index for _, _, index in sorted(zip(lengths, range(len(order)), order, strict=True))]


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


def _next_input(inp: _BlockInput, hidden: torch.Tensor, slot: Slot) -> _BlockInput:
    args, kwargs = set_slot(inp.args, inp.kwargs, slot, hidden)
    return _BlockInput(args, kwargs, inp.token_mask)


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
        workers: Workers,
    ) -> None:
        self.model, self.pattern, self.method, self.cfg = model, pattern, method, cfg
        self.total, self.progress, self.workers = total, progress, workers
        self.result = OneShotResult()

    def stage(self, label: str) -> None:
        """Report the start of a block or stage (``label``) through the progress callback."""
        if self.progress is not None:
            self.progress(len(self.result.outcomes), self.total, label)

    def prune(self, layers: Sequence[LayerCandidate], collector: Collector) -> None:
        for cand in layers:
            param = self.model.get_parameter(cand.param)  # looked up now: a BlockIO replaces a block's parameters
            outcome = solve_layer(
                param.detach(),
                cand,
                collector.segments.get(cand.param, []),
                self.pattern,
                self.method,
                self.cfg,
                self.workers,
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
    # On the CPU, torch runs one intra-op thread and the work is split into tasks fixed by the problem
    # (batches, row slices) on a pool of workers: the same bits whatever the thread count.
    cpu = device.type == "cpu"
    workers = Workers(default_workers(torch.get_num_threads()) if cpu else 1)
    pruner = _Pruner(model, pattern, method, cfg, len(layers), progress, workers)
    try:
        with torch.no_grad(), torch_threads(1 if cpu else torch.get_num_threads()), workers:
            blocks = find_blocks(model, layers)
            if moved:  # streamed blocks are on the meta device: run only as far as the first one
                streamed = blocks is not None and block_io is not None
                first = dict(model.named_modules())[blocks[1][0]] if streamed and blocks is not None else None
                check_batch_fits(
                    model, moved[0], f"--calib {cfg.spec}", extra=model_call_kwargs(model), stop_before=first
                )
            done: set[str] = set()
            outputs: list[Any] | None = [] if block_io is not None or _replayable(model, blocks, layers) else None
            slot = _block_slot(model, blocks[1], moved, block_io) if blocks is not None and moved else None
            if blocks is not None and slot is not None:
                _prune_blocks(model, blocks[1], layers, moved, pruner, done, slot, block_io, outputs)
                pruner.result.path = PATH_BLOCKS
                pruner.result.notes.append(
                    f"{method}: calibrated block by block over the {len(blocks[1])} blocks of {blocks[0]}, "
                    f"each block's inputs produced by the pruned blocks before it"
                )
            elif block_io is not None:
                raise InputError(
                    "the model's repeated blocks do not pass their hidden states from one to the next, so it cannot "
                    "be calibrated block by block from its shards: load it whole (give -o FILE.safetensors)"
                )
            elif blocks is not None and moved:
                pruner.result.notes.append(
                    f"{method}: the blocks of {blocks[0]} do not chain (the model computes something between them, "
                    "skips across them or calls them out of order)"
                )
            rest = [cand for cand in layers if cand.param not in done]
            if rest and blocks is not None and outputs is not None and (outputs or block_io is not None):
                with _replaying(model, blocks[0], outputs, moved):
                    _prune_stages(model, rest, moved, pruner, done, cfg, capture=False)
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


def _replayable(model: nn.Module, blocks: tuple[str, list[str]] | None, layers: Sequence[LayerCandidate]) -> bool:
    """Whether the layers outside the blocks can be pruned with the blocks replaying their last outputs.

    True when every such layer is defined after the blocks (a pooler, a head: they run after them) and
    the model has no BatchNorm (whose re-estimation must run the blocks): then one pass per stage costs
    the layers outside the blocks only, instead of a forward of the whole model, with the same inputs.
    """
    if blocks is None or has_batchnorm(model):
        return False
    names = [name for name, _ in model.named_modules()]
    last_block = names.index(blocks[1][-1])
    position = {name: index for index, name in enumerate(names)}
    return all(
        position.get(cand.module, -1) > last_block and not _inside(cand.module, blocks[0])
        for cand in layers
        if not any(_inside(cand.module, block) for block in blocks[1])
    )


class _Replay(nn.Module):
    """Stands in for every block on the passes after the blocks are pruned: returns the last block's output."""

    def __init__(self, outputs: Sequence[Any]) -> None:
        super().__init__()
        self.outputs = outputs
        self.local = threading.local()  # the batch each thread runs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.outputs[self.local.index]


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
        replay.local.index = matches[0]

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
    slot: Slot,
    block_io: BlockIO | None = None,
    outputs: list[Any] | None = None,
) -> None:
    """Block-by-block pruning of chained blocks (each takes the previous one's hidden states at ``slot``).

    With ``block_io`` each block is loaded before and written and freed after it is pruned;
    ``outputs``, when given, receives the last block's outputs on every batch.
    """
    modules = dict(model.named_modules())
    inputs = _capture_block_inputs(model, modules[block_names[0]], batches)
    for index, name in enumerate(block_names):
        block = modules[name]
        if block_io is not None:
            block_io.load(name)
        pruner.stage(f"block {index + 1}/{len(block_names)} {name}")
        frozen = _prune_in_module(
            model, block, [cand for cand in layers if _inside(cand.module, name)], inputs, pruner, done
        )

        def run(
            i: int,
            block: nn.Module = block,
            name: str = name,
            frozen: FrozenOutputs = frozen,
            inputs: Sequence[_BlockInput] = inputs,
        ) -> Any:
            inp = inputs[i]
            with frozen.batch(i, recording=False):
                out = block(*inp.args, **inp.kwargs)
            hidden = primary_output(out)
            if hidden is None:
                raise InputError(f"block {name} returned no tensor on a calibration batch: report this model to nmcli")
            return _next_input(inp, hidden, slot), out

        next_inputs = []
        try:
            with frozen.replaying():
                for next_input, out in pruner.workers.map(run, range(len(inputs))):
                    next_inputs.append(next_input)
                    if outputs is not None and name == block_names[-1]:
                        outputs.append(out)
                    del out
        finally:
            frozen.clear()  # its hooks leave the model
        if block_io is not None:
            block_io.done(name, pruner.result.outcomes)
        inputs = next_inputs
        trim_heap()


def _prune_in_module(
    model: nn.Module,
    module: nn.Module,
    layers: Sequence[LayerCandidate],
    inputs: Sequence[_BlockInput],
    pruner: _Pruner,
    done: set[str],
) -> FrozenOutputs:
    """Prune the ``layers`` inside ``module`` group by group, running only ``module`` on its captured ``inputs``.

    Each group's pass ends at the group's own call when its layers are Linears reading one input (q, k
    and v), else where the next group's first layer is called (when no layer of the group runs after
    that point): the rest of the module cannot change the group's statistics. Sub-modules that finished
    before a group was called keep their outputs for the later passes (:class:`FrozenOutputs`), so each part
    of a block runs about once in all. Wanda collects every layer of the block in one pass of the dense
    block, as its reference implementation does (Sun et al. 2023): its score needs only input norms.
    The batches of a pass run on the pruner's workers, their statistics added in batch order.

    Returns:
        The outputs the last pass kept, for the pass that produces the module's pruned outputs.
    """
    if pruner.method == "wanda":
        groups: list[_Group] = [_Group(list(layers), None, False)]
        once: set[str] = set()
    else:
        groups, once = _sequential_groups(model, module, layers, inputs[0])
    frozen = FrozenOutputs(module, once)
    try:
        for group in groups:
            _prune_group(model, module, group, inputs, pruner, done, frozen)
    except BaseException:
        frozen.clear()
        raise
    return frozen


def _prune_group(
    model: nn.Module,
    module: nn.Module,
    group: _Group,
    inputs: Sequence[_BlockInput],
    pruner: _Pruner,
    done: set[str],
    frozen: FrozenOutputs,
) -> None:
    """One group's statistics pass over ``module`` (the batches on the pruner's workers), then its solve."""
    modules = dict(model.named_modules())
    collector = Collector(model, group.layers, shared=group.shared)
    starts = [modules[name] for name in dict.fromkeys(cand.module for cand in group.layers)]
    marks = [m.register_forward_pre_hook(frozen.stop_recording) for m in starts]
    # after the collector's and the marks' pre-hooks: a shared group's pass ends at its own first call
    stop = group.layers[0].module if group.shared else group.stop
    handle = modules[stop].register_forward_pre_hook(_stop_forward) if stop is not None else None

    def run(i: int, collector: Collector = collector) -> list[Any]:
        inp = inputs[i]
        collector.begin(inp.token_mask)
        with frozen.batch(i, recording=True):
            try:
                module(*inp.args, **inp.kwargs)
            except _StopForward:
                pass
        return collector.end()

    try:
        with frozen.replaying():
            for additions in pruner.workers.map(run, range(len(inputs))):
                collector.commit(additions)
    finally:
        collector.remove()
        for mark in marks:
            mark.remove()
        if handle is not None:
            handle.remove()
    frozen.end_pass()
    pruner.prune(group.layers, collector)
    done.update(cand.param for cand in group.layers)
    del collector
    trim_heap()


def _stop_forward(*_: Any) -> None:
    raise _StopForward


def _block_slot(
    model: nn.Module, block_names: list[str], batches: Sequence[Batch], block_io: BlockIO | None
) -> Slot | None:
    """Where the blocks take the previous block's hidden states, or None when they do not chain.

    In memory this is observed on the first batch (:mod:`nmcli.pipelines.chaining`). Streamed
    blocks are on the meta device and cannot run ahead: their hidden states are taken to be the
    first argument (or ``hidden_states``) of block 0, as in every transformers decoder.
    """
    if block_io is None:
        extra = model_call_kwargs(model)
        order, calls = observe_calls(model, block_names, lambda: model(*batches[0].args, **batches[0].kwargs, **extra))
        return chain_slot(order, calls, block_names)
    first = _capture_block_inputs(model, model.get_submodule(block_names[0]), batches[:1])
    if not first:
        return None
    slot: Slot = ("arg", 0) if first[0].args else ("kwarg", "hidden_states")
    return slot if isinstance(get_slot(first[0].args, first[0].kwargs, slot), torch.Tensor) else None


@dataclass
class _Group:
    """Layers pruned together: their statistics come from one pass (see :func:`_sequential_groups`)."""

    layers: list[LayerCandidate]
    stop: str | None  # the module whose call ends the pass, None: the whole module runs
    shared: bool  # Linears reading one input: collected once, the pass ends at the first one's call


def _sequential_groups(
    model: nn.Module, block: nn.Module, layers: Sequence[LayerCandidate], sample: _BlockInput
) -> tuple[list[_Group], set[str]]:
    """The block's layers in the order they run, grouped by shared input (q, k and v read the same tensor).

    Each group is pruned before the next one collects its statistics, so the attention output
    projection sees the pruned q/k/v and the MLP's down projection the pruned up projection
    (SparseGPT's "true sequential" order). Layers that never run form a last group. Each group
    comes with the module whose call ends its statistics (the next group's first layer), or None
    when a layer of the group also runs after that call (a shared layer called twice) or none follows.

    Returns:
        The groups, and the names (relative to ``block``) of the sub-modules called once on ``sample``.
    """
    modules = dict(model.named_modules())
    seen: list[tuple[str, Any]] = []
    calls: list[str] = []
    handles = []
    for module_name in dict.fromkeys(cand.module for cand in layers):

        def hook(mod: nn.Module, args: tuple[Any, ...], name: str = module_name) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            key = x  # the tensor itself, held: an address freed and reused would group unrelated inputs
            calls.append(name)
            if all(name != done for done, _ in seen):
                seen.append((name, key))

        handles.append(modules[module_name].register_forward_pre_hook(hook))
    counts: dict[str, int] = {}
    for name, sub in block.named_modules():
        if name:

            def count(mod: nn.Module, args: Any, name: str = name) -> None:
                counts[name] = counts.get(name, 0) + 1

            handles.append(sub.register_forward_pre_hook(count))
    try:
        block(*sample.args, **sample.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    grouped: list[list[str]] = []
    keys: list[Any] = []
    for module_name, key in seen:
        if key is not None and keys and keys[-1] is key:
            grouped[-1].append(module_name)
        else:
            grouped.append([module_name])
            keys.append(key)
    groups: list[_Group] = []
    for index, names in enumerate(grouped):
        stop = grouped[index + 1][0] if index + 1 < len(grouped) else None
        if stop is not None and any(name in names for name in calls[calls.index(stop) :]):
            stop = None
        members = [cand for name in names for cand in layers if cand.module == name]
        shared = Collector.can_share(members) and all(calls.count(name) == 1 for name in names)
        groups.append(_Group(members, stop, shared))
    ran = set(calls)
    rest = [cand for cand in layers if cand.module not in ran]
    once = {name for name, n in counts.items() if n == 1}
    return ([*groups, _Group(rest, None, False)] if rest else groups), once


def _prune_stages(
    model: nn.Module,
    layers: Sequence[LayerCandidate],
    batches: Sequence[Batch],
    pruner: _Pruner,
    done: set[str],
    cfg: CalibrationConfig,
    *,
    capture: bool = True,
) -> None:
    """Stage by stage, in execution order, each stage's statistics taken on the partly pruned model.

    A stage the model calls once per pass has its inputs captured by running the model up to it
    (``capture``), and only the stage then runs, group by group; any other stage takes one pass of
    the whole model. Should a pass of the partly pruned model fail, the remaining layers get their
    statistics from one forward of the model as it is (:func:`_say_dense` records it).
    """
    order, calls = _execution_order(model, find_stages(model, layers), batches[0])
    extra = model_call_kwargs(model)
    recalibrate = cfg.bn_recalibrate and has_batchnorm(model)
    ran = 0
    for index, stage in enumerate(order):
        in_stage = [cand for cand in layers if _inside(cand.module, stage) and cand.param not in done]
        if not in_stage:
            continue
        pruner.stage(f"stage {index + 1}/{len(order)} {stage or 'model'}")
        module = model.get_submodule(stage)
        inputs = _capture_block_inputs(model, module, batches) if capture and stage and calls.get(stage) == 1 else []
        try:
            if inputs and len(inputs) == len(batches):
                _prune_in_module(model, module, in_stage, inputs, pruner, done).clear()
            else:
                _prune_on_passes(model, in_stage, batches, pruner, done, extra)
        except (RuntimeError, TypeError, ValueError) as exc:
            rest = [c for c in layers if c.param not in done]
            pruner.stage("all layers, one forward")
            _prune_on_passes(model, rest, batches, pruner, done, extra)
            _say_dense(pruner, len(rest), exc)
            return
        ran += 1
        del inputs
        if recalibrate:
            recalibrate_batchnorm(model, batches)
    if not pruner.result.path:
        pruner.result.path = PATH_STAGES
        pruner.result.notes.append(
            f"{pruner.method}: calibrated stage by stage ({ran} stages, each stage's inputs produced by the "
            "partly pruned model)"
        )
    else:
        pruner.result.notes.append(f"{len(layers)} layer(s) outside the blocks pruned on passes of the whole model")


def _prune_on_passes(
    model: nn.Module,
    layers: Sequence[LayerCandidate],
    batches: Sequence[Batch],
    pruner: _Pruner,
    done: set[str],
    extra: dict[str, Any],
) -> None:
    collector = Collector(model, layers)

    def run(i: int) -> list[Any]:
        collector.begin(batches[i].kwargs.get("attention_mask"))
        model(*batches[i].args, **batches[i].kwargs, **extra)
        return collector.end()

    try:
        for additions in pruner.workers.map(run, range(len(batches))):
            collector.commit(additions)
    finally:
        collector.remove()
    pruner.prune(layers, collector)
    done.update(cand.param for cand in layers)


def _say_dense(pruner: _Pruner, count: int, cause: Exception) -> None:
    """Record the last resort: ``count`` layers took their statistics from one forward, no error propagation."""
    pruner.result.path = PATH_DENSE
    pruner.result.notes.append(
        f"{pruner.method}: a pass of the partly pruned model failed ({type(cause).__name__}), so {count} "
        "layer(s) took their statistics from one forward of the model, without error propagation"
    )


def _execution_order(model: nn.Module, stages: list[str], batch: Batch) -> tuple[list[str], dict[str, int]]:
    """``stages`` sorted by when they first run on ``batch`` (stages that never run keep their place, last),
    and how many times each ran."""
    modules = dict(model.named_modules())
    first_seen: dict[str, int] = {}
    calls: dict[str, int] = {}
    handles = []
    for stage in stages:
        if stage == "":
            continue

        def hook(mod: nn.Module, args: Any, name: str = stage) -> None:
            first_seen.setdefault(name, len(first_seen))
            calls[name] = calls.get(name, 0) + 1

        handles.append(modules[stage].register_forward_pre_hook(hook))
    try:
        model(*batch.args, **batch.kwargs, **model_call_kwargs(model))
    finally:
        for handle in handles:
            handle.remove()
    return sorted(stages, key=lambda s: (s not in first_seen, first_seen.get(s, 0))), calls

"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for SR-STE fine-tuning under torchrun.

``--shard fsdp`` shards every repeated block (the blocks :func:`~nmcli.pipelines.blocks.find_blocks`
finds) and the root, so each rank holds ``1/world`` of the dense weights, their gradients and the
optimizer state. FSDP2 shards dim 0 of every parameter (output rows for Linear/ConvNd, experts
for an MoE stack ``[E, out, in]``): N:M groups along any other axis stay whole on one rank, so each
rank recomputes its rows' masks and applies the SR-STE decay on its own shard (see
:mod:`nmcli.algorithms.srste`). A layer whose groups run along dim 0 (transformers ``Conv1D``) is
checked to be split only at group boundaries. Resumable state is a ``torch.distributed.checkpoint``
directory beside the output. torch.distributed is imported only when a function here runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmcli.algorithms.srste import SparseTraining
from nmcli.errors import InputError, Interrupted
from nmcli.models.layers import LayerCandidate
from nmcli.pipelines.blocks import find_blocks
from nmcli.pipelines.dcp_read import load_dcp, names_code

SHARD_MODES = ("ddp", "fsdp")


class StopRequest:
    """The first Ctrl-C asks the loop to stop at the next step boundary; a second one stops at once.

    Under torchrun the agent passes a terminal's Ctrl-C on to its workers, which got it already: a
    repeat within 5 s is that, not a second request. SIGTERM and SIGHUP do the same when the process handles them (the CLI turns them into
    :class:`~nmcli.errors.Interrupted`); left at their defaults (library use) they are not touched.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._first = 0.0

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
            for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
                if signum is not None and callable(signal.getsignal(signum)):
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            if os.environ.get("TORCHELASTIC_RUN_ID") and time.monotonic() - self._first < 5.0:
                return  # torchrun passing on the Ctrl-C its workers got too: not a second request
            raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted(signum)
        self.requested, self.signum, self._first = True, signum, time.monotonic()

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)


def check_shardable(sparse: SparseTraining, world: int) -> None:
    """Refuse a pruned parameter whose N:M groups the dim-0 sharding over ``world`` ranks would split.

    Raises:
        InputError: such a parameter, with the process counts that work and the ``--shard ddp`` fallback.
    """
    for sp in sparse:
        shape, pattern = tuple(sp.dense.shape), sp.parametrization.pattern
        if sp.parametrization.axis % len(shape) != 0:
            continue  # groups along another axis: every group sits in one row range
        chunk = -(-shape[0] // world)
        if chunk % pattern.m:
            raise InputError(
                f"--shard fsdp: {sp.param} {list(shape)} has its {pattern} groups along dim 0, which FSDP shards; "
                f"{world} processes split its {shape[0]} rows into chunks of {chunk}, not a multiple of M={pattern.m}, "
                f"which would split groups: use a process count that gives chunks of a multiple of {pattern.m} rows, "
                "or --shard ddp"
            )


def _blocks(model: nn.Module, sparse: SparseTraining) -> list[nn.Module]:
    candidates = [
        LayerCandidate(
            sp.param.rpartition(".")[0], sp.param, "", tuple(sp.dense.shape), sp.parametrization.axis, True, ""
        )
        for sp in sparse
    ]
    found = find_blocks(model, candidates)
    if found is None:
        return []
    modules = dict(model.named_modules())
    return [modules[name] for name in found[1] if name in modules]


def _checkpointed(block: nn.Module) -> None:
    """Recompute ``block``'s activations in the backward pass instead of keeping them."""
    from torch.utils.checkpoint import checkpoint

    forward = block.forward

    def run(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = run


def shard_model(
    model: nn.Module, sparse: SparseTraining, teacher: nn.Module | None, *, bf16: bool, checkpointing: bool
) -> int:
    """``fully_shard`` the student's repeated blocks and root (and the teacher's, the same way), in place.

    Args:
        model: the student, its pruned weights already under SR-STE (:class:`SparseTraining`).
        sparse: the student's SR-STE state.
        teacher: the frozen distillation teacher, or None.
        bf16: compute in bf16 with fp32 master weights and fp32 gradient reduction.
        checkpointing: recompute each block's activations in the backward pass.

    Returns:
        The number of blocks sharded on their own (0: the model is one FSDP unit).
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check_shardable(sparse, dist.get_world_size())
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs: dict[str, Any] = {"mp_policy": policy} if policy is not None else {}
    blocks = _blocks(model, sparse)
    for block in blocks:
        if checkpointing:
            _checkpointed(block)
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    if teacher is not None:
        teacher_blocks = _blocks_like(teacher, model, blocks)
        for block in teacher_blocks:
            fully_shard(block, **kwargs)
        fully_shard(teacher, **kwargs)
    return len(blocks)


def _blocks_like(teacher: nn.Module, model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """The teacher's modules under the names of the student's blocks (none when the architectures differ)."""
    names = {id(module): name for name, module in model.named_modules()}
    modules = dict(teacher.named_modules())
    found = [modules.get(names[id(block)]) for block in blocks]
    return [m for m in found if m is not None] if all(m is not None for m in found) else []


def agreed_signal(signum: int | None, device: torch.device) -> int | None:
    """The stop signal any rank got (the highest number when several did), else None: a collective every rank calls.

    So a SIGTERM that reaches one rank stops all of them at the same step, and each reports it.
    """
    import torch.distributed as dist

    value = torch.tensor([signum or 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item()) or None


def sharded_state_path(output: str | os.PathLike[str]) -> Path:
    """The ``torch.distributed.checkpoint`` directory beside a resumable output ``OUT.safetensors``: ``OUT.dcp``."""
    out = Path(output)
    return out.with_name(out.name.removesuffix(".safetensors") + ".dcp")


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write the sharded model and optimizer state (every rank its own shards) as one file set at ``path``.

    Written into ``path.tmp`` and swapped in once every rank is done, so an interrupted save keeps the last one.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = path.with_name(path.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        old = path.with_name(path.name + ".old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read the state :func:`save_sharded` wrote into the sharded model and optimizer (each rank its shards).

    Raises:
        InputError: ``path`` is missing or unreadable (run again without --resume).
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not path.is_dir():
        raise InputError(
            f"--resume: {path} (the sharded training state of --shard fsdp) is missing: run again without --resume"
        )
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        load_dcp({"model": model_state, "optim": optim_state}, path)
    except Exception as exc:
        if getattr(exc, "names_code", False) or names_code(exc):
            raise InputError(
                f"--resume: {path} names code to run, not only training state: nmcli never runs a file's code; "
                "run again without --resume"
            ) from exc
        raise InputError(
            f"--resume: {path} is not readable sharded training state ({exc}): run again without --resume"
        ) from exc
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def remove_sharded(path: Path) -> None:
    """Remove the sharded state of a finished run (rank 0)."""
    shutil.rmtree(path, ignore_errors=True)

"""Outputs of a block's sub-modules that the rest of its calibration can no longer change, replayed.

Block-by-block calibration (:mod:`nmcli.pipelines.blocks`) runs a block once per group of layers;
without this, every pass would recompute everything before the group again.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

# Outputs kept by this class for one block, at most (beyond that, modules run again).
FROZEN_BYTES = 512 << 20


class FrozenOutputs:
    """Outputs of a block's sub-modules that the rest of its calibration can no longer change.

    A sub-module whose call finished before the group being calibrated was first called does not
    depend on that group (nor on any later one): once the group is pruned, every later pass of the
    block would compute the same output from the same inputs, to the bit. So each pass keeps the
    outputs of the outermost such sub-modules (a copy per batch, up to ``FROZEN_BYTES``), and the
    later passes return them instead of running the sub-module again. Only sub-modules called once
    per pass (``once``) whose output is a tensor or a tuple of tensors are kept; in-place modules
    (``inplace=True``: a ReLU that overwrites its input) always run, as the caller may read that input.
    """

    def __init__(self, block: nn.Module, once: set[str]) -> None:
        self.modules = {
            name: m
            for name, m in block.named_modules()
            if name in once and "forward" not in m.__dict__ and not getattr(m, "inplace", False)
        }
        self.kept: dict[str, dict[int, Any]] = {}
        self.fresh: dict[str, dict[int, Any]] = {}
        self.size = 0
        self._local = threading.local()
        self._lock = threading.Lock()
        self._handles = [m.register_forward_hook(self._keep(name)) for name, m in self.modules.items()]

    @contextlib.contextmanager
    def batch(self, index: int, *, recording: bool) -> Iterator[None]:
        """Run one batch's pass in this thread: kept outputs of batch ``index`` replay, new ones are kept while ``recording``."""
        self._local.index, self._local.recording = index, recording
        try:
            yield
        finally:
            self._local.recording = False

    def stop_recording(self, *_: Any) -> None:
        """A pre-hook on the group's layers: what finishes after this call depends on the group."""
        self._local.recording = False

    def _keep(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not getattr(self._local, "recording", False):
                return
            index = self._local.index
            if index in self.kept.get(name, {}):  # replayed
                return
            copy = _copied(output)
            if copy is None:
                return
            size = _bytes(copy)
            with self._lock:
                if self.size + size > FROZEN_BYTES:
                    return
                inner = [n for n in self.fresh if n.startswith(name + ".") and index in self.fresh[n]]
                for n in inner:  # the outer module's output replaces its children's
                    self.size -= _bytes(self.fresh[n].pop(index))
                self.fresh.setdefault(name, {})[index] = copy
                self.size += size

        return hook

    def end_pass(self) -> None:
        """Keep what this pass recorded for the later passes; drop kept outputs now inside a kept module."""
        for name, per_batch in self.fresh.items():
            self.kept.setdefault(name, {}).update(per_batch)
        self.fresh = {}
        for name in list(self.kept):
            if any(name.startswith(outer + ".") for outer in self.kept if outer != name):
                self.size -= sum(_bytes(v) for v in self.kept.pop(name).values())

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """The kept modules' ``forward`` returns a copy of their kept output of the batch being run."""
        replaced = []
        for name, per_batch in self.kept.items():
            module = self.modules[name]
            original = module.forward

            def forward(
                *args: Any, per_batch: dict[int, Any] = per_batch, original: Any = original, **kwargs: Any
            ) -> Any:
                kept = per_batch.get(getattr(self._local, "index", -1))
                return original(*args, **kwargs) if kept is None else _copied(kept)

            module.forward = forward
            replaced.append(module)
        try:
            yield
        finally:
            for module in replaced:
                del module.forward

    def clear(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.kept, self.fresh, self.size = {}, {}, 0


def _copied(output: Any) -> Any:
    """A copy of a module's output when it is a tensor or a tuple of tensors and Nones, else None."""
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if type(output) is tuple and all(o is None or isinstance(o, torch.Tensor) for o in output):
        return tuple(None if o is None else o.detach().clone() for o in output)
    return None


def _bytes(output: Any) -> int:
    parts = output if isinstance(output, tuple) else (output,)
    return sum(o.numel() * o.element_size() for o in parts if isinstance(o, torch.Tensor))

"""The device helpers only ``bench`` needs: a guard that makes a resolved device current, and its capability.

torch's ``cuda`` means "the current CUDA device", and several calls act on the current device
only: ``torch.cuda.synchronize()``, ``reset_peak_memory_stats()``, ``max_memory_allocated()``,
CUDA events, ``torch.cuda.current_stream()`` and TensorRT's engine deserialization. So ``bench``
resolves ``cuda`` to ``cuda:<current>`` once (:func:`nmcli.device.resolve_device`, the rules every
command shares) and runs everything for a device inside :func:`device_guard`,
which makes that device current (and restores the previous one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from nmcli.device import cuda_index


@contextlib.contextmanager
def device_guard(device: str) -> Iterator[None]:
    """Make ``device`` (``cuda:N``) the current CUDA device inside the block.

    Nothing for the CPU, nor when torch itself sees no CUDA (onnxruntime-gpu beside a CPU-only torch:
    onnxruntime picks its device through the provider's ``device_id``).
    """
    import torch

    index = cuda_index(device)
    if index is None or not torch.cuda.is_available():
        yield
        return
    with torch.cuda.device(index):
        yield


def capability(device: str) -> tuple[int, int]:
    """The compute capability ``(major, minor)`` of a resolved CUDA device."""
    import torch

    index = cuda_index(device)
    if index is None:
        raise ValueError(f"{device} is not a CUDA device")
    major, minor = torch.cuda.get_device_capability(index)
    return int(major), int(minor)


__all__ = ["capability", "device_guard"]

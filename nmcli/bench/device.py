"""``--device`` for ``bench``: one resolved name (``cpu`` or ``cuda:N``) and a guard that makes it current.

torch's ``cuda`` means "the current CUDA device", and several calls act on the current device
only: ``torch.cuda.synchronize()``, ``reset_peak_memory_stats()``, ``max_memory_allocated()``,
CUDA events, ``torch.cuda.current_stream()`` and TensorRT's engine deserialization. So ``bench``
resolves ``cuda`` to ``cuda:<current>`` once (:func:`resolve_device`) and runs everything for a
device inside :func:`device_guard`, which makes that device current (and restores the previous one).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from nmcli.errors import BackendUnavailableError, InputError

_CUDA = re.compile(r"cuda(?::(\d+))?")


def _no_cuda(device: str) -> BackendUnavailableError:
    import torch

    build = "a CPU-only build" if torch.version.cuda is None else f"a CUDA {torch.version.cuda} build"
    return BackendUnavailableError(
        f"--device {device} needs a CUDA GPU, and torch ({torch.__version__}, {build}) sees none: "
        "run on a GPU machine with a CUDA build of torch, or use --device cpu"
    )


def parse_device(device: str) -> tuple[str, int | None]:
    """``("cpu", None)``, ``("cuda", None)`` for a bare ``cuda``, or ``("cuda", N)`` (syntax only).

    Raises:
        InputError: anything else.
    """
    text = device.strip().lower()
    if text == "cpu":
        return "cpu", None
    match = _CUDA.fullmatch(text)
    if match is None:
        raise InputError(f"unknown --device {device!r}: use cpu, cuda or cuda:N")
    return "cuda", None if match.group(1) is None else int(match.group(1))


def normalize_device(device: str | None, *, cuda_count: int, current: int = 0) -> str:
    """``cpu`` or ``cuda:N`` for a ``--device`` value, given what the machine has (a pure function).

    Args:
        device: ``cpu``, ``cuda``, ``cuda:N``, or None (``cuda`` when there is a GPU, else ``cpu``).
        cuda_count: how many CUDA devices torch sees (0 without CUDA).
        current: the current CUDA device, which a bare ``cuda`` means.

    Raises:
        InputError: an unknown device, or an index torch does not see.
        BackendUnavailableError: a CUDA device asked for without CUDA.
    """
    if device is None:
        return f"cuda:{current}" if cuda_count > 0 else "cpu"
    kind, given = parse_device(device)
    if kind == "cpu":
        return "cpu"
    if cuda_count <= 0:
        raise _no_cuda(device)
    index = current if given is None else given
    if index >= cuda_count:
        seen = "cuda:0" if cuda_count == 1 else f"cuda:0 to cuda:{cuda_count - 1}"
        raise InputError(f"--device {device}: torch sees {cuda_count} CUDA device(s), {seen}")
    return f"cuda:{index}"


def resolve_device(device: str | None) -> str:
    """:func:`normalize_device` with the CUDA devices torch sees here.

    Raises:
        InputError: an unknown device or a CUDA index that does not exist.
        BackendUnavailableError: a CUDA device asked for without CUDA.
    """
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    current = torch.cuda.current_device() if count else 0
    return normalize_device(device, cuda_count=count, current=current)


def cuda_index(device: str) -> int | None:
    """The CUDA device index of a resolved device (``cuda:N`` -> N), None for the CPU."""
    match = _CUDA.fullmatch(device)
    if match is None:
        return None
    if match.group(1) is None:
        raise ValueError(f"{device!r} is not resolved: call resolve_device() first")
    return int(match.group(1))


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


__all__ = ["capability", "cuda_index", "device_guard", "normalize_device", "parse_device", "resolve_device"]

"""``--device``: what a device name means, written once for every command.

A device is ``cpu``, ``cuda`` or ``cuda:N`` (case and spaces ignored); ``auto``, or no device,
is ``cuda`` when torch sees a GPU, else ``cpu``. It resolves to one name, ``cpu`` or ``cuda:N``:
a bare ``cuda`` means the current CUDA device (or the index the caller gives, e.g. a process's
local rank). torch is imported only by :func:`resolve_device`, which asks it what this machine has.
"""

from __future__ import annotations

import re

from nmcli.errors import BackendUnavailableError, InputError

AUTO = "auto"
_CUDA = re.compile(r"cuda(?::(\d+))?")


def no_cuda(device: str) -> BackendUnavailableError:
    """The exit-3 error for a CUDA ``device`` on a machine where torch sees no GPU."""
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
        current: the CUDA device a bare ``cuda`` means.

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
        raise no_cuda(device)
    index = current if given is None else given
    if index >= cuda_count:
        seen = "cuda:0" if cuda_count == 1 else f"cuda:0 to cuda:{cuda_count - 1}"
        raise InputError(f"--device {device}: torch sees {cuda_count} CUDA device(s), {seen}")
    return f"cuda:{index}"


def resolve_device(device: str | None, *, current: int | None = None) -> str:
    """:func:`normalize_device` with the CUDA devices torch sees here; ``auto`` is None.

    Args:
        device: ``cpu``, ``cuda``, ``cuda:N``, ``auto`` or None.
        current: the CUDA device a bare ``cuda`` (and ``auto``) means; default torch's current one.

    Raises:
        InputError: an unknown device or a CUDA index that does not exist.
        BackendUnavailableError: a CUDA device asked for without CUDA.
    """
    import torch

    if device is not None and device.strip().lower() == AUTO:
        device = None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if current is None:
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


__all__ = ["AUTO", "cuda_index", "no_cuda", "normalize_device", "parse_device", "resolve_device"]

"""The ``nmcli-trainstate/1`` format: finetune's resumable training state beside its output.

``OUT.trainstate.pt`` next to a resumable checkpoint ``OUT.safetensors``: a ``torch.save`` dict
(``format``, optimizer and scheduler state, step, RNG states, the options that must not change on
``--resume``), read back with ``weights_only=True``. torch is imported when a state is saved or read.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from nmcli.errors import InputError
from nmcli.io import atomic_write_bytes

TRAINSTATE_FORMAT = "nmcli-trainstate/1"


def trainstate_path(output: str | os.PathLike[str]) -> Path:
    """The sidecar with optimizer/scheduler state next to a resumable checkpoint."""
    out = Path(output)
    return out.with_name(out.name.removesuffix(".safetensors") + ".trainstate.pt")


def save_trainstate(path: Path, state: dict[str, Any]) -> None:
    """Write the training state atomically (a resumed run reads exactly what was saved)."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue(), force=True)


def load_trainstate(path: Path) -> dict[str, Any]:
    """Read training state saved by :func:`save_trainstate`, refusing anything else (exit 2)."""
    import torch

    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(
            f"--resume: {path} is not readable training state ({exc}): run again without --resume"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != TRAINSTATE_FORMAT:
        raise InputError(f"--resume: {path} is not nmcli training state: run again without --resume")
    return state

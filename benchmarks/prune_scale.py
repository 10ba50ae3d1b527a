"""A ~300M-parameter fp16 stack of Linears, for timing ``nmcli prune`` at scale.

Writes the state dict as ``stack300m.safetensors`` and is itself the architecture (``build``)::

    python benchmarks/prune_scale.py --out /tmp/scale
    /usr/bin/time -v nmcli prune /tmp/scale/stack300m.safetensors \\
        --arch py:benchmarks/prune_scale.py:build -p 2:4 -o /tmp/scale/stack300m-2of4.safetensors --force

Random weights are generated one layer at a time, so the script's own peak memory stays near
one copy of the model.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn

WIDTH = 4096
LAYERS = 18  # 18 x (4096 x 4096 + 4096) = 302M parameters, 604 MB in fp16
DTYPE = torch.float16


def build() -> nn.Module:
    """The architecture: ``LAYERS`` Linear(WIDTH, WIDTH) layers in fp16, allocated but not initialized."""
    with torch.device("meta"):
        model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH, dtype=DTYPE) for _ in range(LAYERS)))
    return model.to_empty(device="cpu")


def write_state_dict(path: Path, seed: int = 0) -> int:
    """Write random weights for :func:`build` to ``path``; returns the parameter count."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for i in range(LAYERS):
        state[f"{i}.weight"] = (torch.randn(WIDTH, WIDTH, generator=gen) * WIDTH**-0.5).to(DTYPE)
        state[f"{i}.bias"] = torch.zeros(WIDTH, dtype=DTYPE)
    save_file(state, str(path))
    return sum(v.numel() for v in state.values())


def main() -> None:
    """Write ``stack300m.safetensors`` into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out", help="folder for stack300m.safetensors")
    args = parser.parse_args()
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "stack300m.safetensors"
    count = write_state_dict(path)
    print(f"wrote {path}: {count / 1e6:.1f}M parameters, {os.path.getsize(path) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()

"""The closing lines of the GPU benchmark scripts: one summary line, and the rows as JSON."""

from __future__ import annotations

import json
from typing import Any

from nmcli.io import atomic_write_text


def finish(env: dict[str, Any], rows: list[dict[str, Any]], json_path: str | None) -> int:
    """Print the GPU/library line under a results table and write ``{"environment", "results"}``."""
    kernels = sorted({str(r["sparse_backend"]) for r in rows if r.get("sparse_backend")})
    print(
        f"\n{env['gpu']} (cuda:{env.get('gpu_index')}, sm {env['gpu_capability']}), torch {env['torch']}, "
        f"CUDA {env['torch_cuda']}, cuSPARSELt {env.get('cusparselt')}, kernels: {', '.join(kernels) or 'none ran'}; "
        "p50 of CUDA-event samples; speed-up = dense p50 / 2:4 p50"
    )
    if json_path:
        atomic_write_text(
            json_path, json.dumps({"environment": env, "results": rows}, indent=2, default=str), force=True
        )
    return 0

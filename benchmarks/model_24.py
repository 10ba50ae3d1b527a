"""Whole models, dense against 2:4 semi-structured sparse: a BERT-base-sized encoder and an MLP-heavy decoder stack.

    python benchmarks/model_24.py                               # both models, batch 1,8,32, fp16
    python benchmarks/model_24.py --model decoder --dtype bf16 --batch-size 8 --compile --json model.json

Models are built from the configs below with random weights (no downloads). Every Linear is
pruned 2:4 along its input dimension; the dense side keeps the unpruned random weights. The sparse
side swaps 2:4 Linear weights for semi-structured ones layer by layer through nmcli's own
``to_semi_structured`` (cuSPARSELt with its algorithm searched for the run's token count; CUTLASS on
compute capability 8.x only; a layer whose kernels fail stays dense and is counted). Attention math,
norms and embeddings stay dense, so whole-model speed-ups are below the GEMM-only ones of
``gemm_24.py``. Each run checks the sparse model's outputs against the masked model on dense kernels
(max abs diff). The dense and the sparse model are never on the GPU together, and ``--compile``
compiles (and runs once) before the warm-up, outside the timed and peak-memory window.

Needs a CUDA GPU where a 2:4 kernel runs; without one it says why and exits with code 3.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from gpu_report import finish  # benchmarks/ is on sys.path when a script here runs
from torch import nn

from nmcli.bench.sparse_kernels import no_backend_reason, semi_structured_backends, to_semi_structured
from nmcli.bench.timing import environment, measure
from nmcli.device import resolve_device
from nmcli.nm.masks import apply_mask, nm_mask
from nmcli.nm.pattern import TENSOR_CORE_PATTERN


@dataclass(frozen=True)
class Config:
    """A stack of pre-norm transformer blocks."""

    hidden: int
    heads: int
    ffn: int
    layers: int
    seq: int
    gated: bool  # SwiGLU MLP (gate, up, down) instead of GELU (up, down)
    causal: bool


CONFIGS = {
    # BERT-base: 12 layers, 768 hidden, 12 heads, 3072 FFN, sequence 128
    "encoder": Config(hidden=768, heads=12, ffn=3072, layers=12, seq=128, gated=False, causal=False),
    # MLP-heavy decoder blocks (Llama-7B/Mistral-like widths, 4 blocks), prefill of 128 tokens
    "decoder": Config(hidden=4096, heads=32, ffn=14336, layers=4, seq=128, gated=True, causal=True),
}


class Block(nn.Module):
    """Pre-norm attention + MLP, every projection an ``nn.Linear`` (so each can take 2:4 kernels)."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.c = c
        self.norm1 = nn.LayerNorm(c.hidden)
        self.qkv = nn.Linear(c.hidden, 3 * c.hidden)
        self.out = nn.Linear(c.hidden, c.hidden)
        self.norm2 = nn.LayerNorm(c.hidden)
        self.up = nn.Linear(c.hidden, (2 if c.gated else 1) * c.ffn)
        self.down = nn.Linear(c.ffn, c.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.c.heads, h // self.c.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=self.c.causal
        )
        x = x + self.out(att.transpose(1, 2).reshape(b, s, h))
        hidden = self.up(self.norm2(x))
        if self.c.gated:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden)
        return x + self.down(hidden.contiguous())


def build(c: Config) -> nn.Module:
    """The block stack with random weights (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(*(Block(c) for _ in range(c.layers)))


def prune_24(model: nn.Module) -> nn.Module:
    """Every Linear weight of ``model`` pruned 2:4 along its input dimension (exact +0.0), in place."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                w = module.weight
                w.copy_(apply_mask(w, nm_mask(w, TENSOR_CORE_PATTERN, axis=1)))
    return model


def _time(model: nn.Module, x: torch.Tensor, warmup: int, iters: int, compile: bool, device: str) -> Any:
    runner = model
    if compile:  # compile and run once here: neither belongs in the warm-up or the peak-memory window
        runner = torch.compile(model)
        with torch.inference_mode():
            runner(x)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    def step() -> torch.Tensor:
        return runner(x)

    with torch.inference_mode():
        return measure(step, warmup=warmup, iters=iters, device=device)


def run(
    name: str,
    c: Config,
    batch: int,
    dtype: torch.dtype,
    warmup: int,
    iters: int,
    compile: bool,
    kernels: list[str],
    device: str,
) -> dict[str, Any]:
    """Dense vs 2:4 sparse for one model and batch size; each model is alone on the GPU while timed."""
    x = torch.randn(batch, c.seq, c.hidden, device=device, dtype=dtype)
    row: dict[str, Any] = {"model": name, "batch_size": batch, "tokens": batch * c.seq, "dtype": str(dtype)}
    dense = build(c).eval().to(device, dtype)
    m = _time(dense, x, warmup, iters, compile, device)
    row.update(dense_p50_ms=m.stats.p50, dense_p90_ms=m.stats.p90, dense_peak_mb=m.peak_memory_mb)
    del dense
    if compile:
        torch._dynamo.reset()
    torch.cuda.empty_cache()
    sparse = prune_24(build(c)).eval().to(device, dtype)  # the same seeded weights, masked on the CPU
    with torch.inference_mode():
        want = sparse(x).float()  # the masked model on dense kernels: the reference
    rows = {n: batch * c.seq for n, mod in sparse.named_modules() if isinstance(mod, nn.Linear)}
    report = to_semi_structured(sparse, backends=kernels, probe_rows=rows)
    with torch.inference_mode():
        got = sparse(x).float()
    m = _time(sparse, x, warmup, iters, compile, device)
    row.update(sparse_p50_ms=m.stats.p50, sparse_p90_ms=m.stats.p90, sparse_peak_mb=m.peak_memory_mb)
    row["speedup"] = row["dense_p50_ms"] / row["sparse_p50_ms"]
    row["max_abs_diff_vs_masked_dense"] = float((got - want).abs().max())
    row["max_abs_out"] = float(want.abs().max())
    row["swapped_linears"] = len(report.swapped)
    row["dense_linears"] = len(report.skipped) + len(report.failed)
    row["failed_linears"] = report.failed
    row["cusparselt_alg_ids"] = sorted(set(report.alg_ids.values()))
    row["sparse_backend"] = report.backend
    del sparse
    if compile:
        torch._dynamo.reset()
    return row


def main(argv: list[str] | None = None) -> int:
    """Run the chosen models at each batch size and print the table (and write ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--batch-size", default="1,8,32")
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--compile", action="store_true", help="run both models under torch.compile")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (default: the current CUDA device)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "model_24.py needs a CUDA GPU with compute capability >= 8.0 (2:4 sparse tensor cores), and torch "
            f"{torch.__version__} sees none: nothing was measured",
            file=sys.stderr,
        )
        return 3
    device = resolve_device(args.device)
    index = int(device.split(":")[1])
    torch.cuda.set_device(index)  # a script of its own: every CUDA call below acts on this device
    capability = torch.cuda.get_device_capability(index)
    cusparselt = torch.backends.cusparselt.is_available()
    kernels = semi_structured_backends(capability, cusparselt_available=cusparselt)
    reason = no_backend_reason(capability, cusparselt_available=cusparselt, gpu=torch.cuda.get_device_name(index))
    if reason is not None:
        print(f"{reason}: nothing was measured", file=sys.stderr)
        return 3
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    names = list(CONFIGS) if args.model == "all" else [args.model]
    rows = []
    print(
        f"{'model':<9}{'batch':>6}{'tokens':>8}{'dense ms':>11}{'2:4 ms':>10}{'speed-up':>10}{'dense MB':>10}{'2:4 MB':>9}{'max|diff|':>11}"
    )
    for name in names:
        for batch in (int(b) for b in args.batch_size.split(",")):
            row = run(name, CONFIGS[name], batch, dtype, args.warmup, args.iters, args.compile, kernels, device)
            rows.append(row)
            print(
                f"{name:<9}{batch:>6}{row['tokens']:>8}{row['dense_p50_ms']:>11.3f}{row['sparse_p50_ms']:>10.3f}"
                f"{row['speedup']:>9.2f}x{row['dense_peak_mb']:>10.0f}{row['sparse_peak_mb']:>9.0f}"
                f"{row['max_abs_diff_vs_masked_dense']:>11.3g}  {row['sparse_backend']} "
                f"({row['swapped_linears']} of {row['swapped_linears'] + row['dense_linears']} Linears)",
                flush=True,
            )
            torch.cuda.empty_cache()
    env = environment(device, {**vars(args), "configs": {n: asdict(CONFIGS[n]) for n in names}})
    return finish(env, rows, args.json)


if __name__ == "__main__":
    raise SystemExit(main())

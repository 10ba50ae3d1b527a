"""Per-rank memory of SR-STE fine-tuning under torchrun: FSDP2 (``--shard fsdp``) vs DDP (issue 22).

Runs a Llama-shaped model (default ~300M parameters: hidden 1024, 20 layers, vocab 32000) for a few
AdamW steps on 2 CPU processes (gloo), once with DistributedDataParallel and once with nmcli's FSDP2
sharding (:func:`nmcli.pipelines.distributed.shard_model`), every Linear in the blocks under SR-STE
2:4 (:class:`nmcli.algorithms.srste.SparseTraining`, the refinement added once per step as
``nmcli finetune`` does). Each rank counts the bytes it holds of parameters, gradients and
optimizer state (its local shards under FSDP), and its peak resident memory; rank 0 prints them.

    python benchmarks/fsdp_memory.py                       # both modes, ~300M parameters
    python benchmarks/fsdp_memory.py --layers 4 --hidden 256 --vocab 4096   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import torch

GIB = 1024**3


def _local(tensor: torch.Tensor) -> torch.Tensor:
    local: torch.Tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local


def _bytes(tensors: Any) -> int:
    return sum(_local(t).numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _model(args: argparse.Namespace) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def worker(args: argparse.Namespace) -> None:
    """One rank: build, shard (or replicate), train ``args.steps`` steps, count memory, report."""
    import torch.distributed as dist
    from torch import nn

    from nmcli.algorithms.srste import SparseTraining
    from nmcli.formats.checkpoint import LayerEntry
    from nmcli.pipelines.distributed import shard_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(args)
    total_params = sum(p.numel() for p in model.parameters())
    entries = [
        LayerEntry(f"{name}.weight", name, 2, 4, 1, tuple(module.weight.shape))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in name
    ]
    sparse = SparseTraining(model, entries, refine_in_backward=False)
    trained: nn.Module = model
    if args.shard == "fsdp":
        shard_model(model, sparse, None, bf16=False, checkpointing=False)
    else:
        trained = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(rank))
    started, grads = time.perf_counter(), 0
    for _ in range(args.steps):
        loss = trained(input_ids=ids, labels=ids).loss
        loss.backward()
        sparse.add_refinement()
        optimizer.step()
        sparse.step()
        grads = _bytes(p.grad for p in model.parameters())
        optimizer.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - started) / args.steps
    report = {
        "rank": rank, "params_gib": _bytes(model.parameters()) / GIB, "grads_gib": grads / GIB,
        "optimizer_gib": _bytes(v for s in optimizer.state.values() for v in s.values()) / GIB,
        "masks_gib": _bytes(sp.mask for sp in sparse) / GIB,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "seconds_per_step": seconds, "parameters": total_params,
    }  # fmt: skip
    reports: list[Any] = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        print(json.dumps({"shard": args.shard, "ranks": reports}), flush=True)
    dist.destroy_process_group()


def _launch(args: argparse.Namespace, shard: str) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc), __file__,
        "--worker", "--shard", shard, "--layers", str(args.layers), "--hidden", str(args.hidden),
        "--vocab", str(args.vocab), "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        sys.exit(f"{shard} run failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    return result


def _table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | rank | params GiB | grads GiB | AdamW state GiB | param+grad+optim GiB | masks GiB | peak RSS GiB | s/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for r in result["ranks"]:
            state = r["params_gib"] + r["grads_gib"] + r["optimizer_gib"]
            lines.append(
                f"| {result['shard']} | {r['rank']} | {r['params_gib']:.3f} | {r['grads_gib']:.3f} | "
                f"{r['optimizer_gib']:.3f} | {state:.3f} | {r['masks_gib']:.3f} | {r['peak_rss_gib']:.2f} | "
                f"{r['seconds_per_step']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shard", choices=("ddp", "fsdp", "both"), default="both")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1, help="per rank")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    modes = ("ddp", "fsdp") if args.shard == "both" else (args.shard,)
    results = [_launch(args, mode) for mode in modes]
    print(f"{results[0]['ranks'][0]['parameters'] / 1e6:.0f}M parameters, {args.nproc} processes (gloo, CPU)")
    print(_table(results))
    if len(results) == 2:
        ratio = [
            sum(r[k] for k in ("params_gib", "grads_gib", "optimizer_gib")) for res in results for r in res["ranks"][:1]
        ]
        print(f"FSDP/DDP per-rank param+grad+optimizer memory: {ratio[1] / ratio[0]:.3f}")


if __name__ == "__main__":
    main()

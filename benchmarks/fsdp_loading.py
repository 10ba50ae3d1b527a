"""Per-rank memory of loading and writing a sharded checkpoint under ``finetune --shard fsdp`` (issue 22).

Saves a Llama-shaped model (default ~322M parameters: hidden 1024, 20 layers, vocab 32000) as a sharded
HF directory, prunes it 2:4 with ``nmcli prune hf:DIR -o DIR`` (a sharded checkpoint directory), then
on 2 CPU processes (gloo) loads it the two ways ``finetune --shard fsdp`` can, each rank:

* ``meta``: the skeleton on the meta device, SR-STE and ``fully_shard`` there, then ``to_empty`` and
  each rank reads only its own rows of each weight (:mod:`nmcli.pipelines.materialize`);
* ``eager``: the whole checkpoint loaded and the whole model built on every rank, then sharded
  (what every rank did before).

and writes the result two ways from rank 0:

* ``stream``: a sharded directory, gathered, written and freed one tensor at a time
  (:func:`nmcli.pipelines.shardedout.write_directory`);
* ``whole``: the whole state dict gathered on rank 0, then one nmcli/1 file (the single-file output).

Each phase's peak resident memory is the kernel's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` before the phase), reported absolute and above the rank's resident memory
when the phase started (after ``import torch, transformers``: the baseline every rank pays).

    python benchmarks/fsdp_loading.py                                      # ~322M parameters
    python benchmarks/fsdp_loading.py --layers 2 --hidden 256 --vocab 4096  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

GIB = 1024**3


def _status(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process, GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def _reset_peak() -> float:
    """Reset the high-water mark to the current resident memory; returns that (GiB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _prepare(args: argparse.Namespace, root: Path) -> Path:
    import transformers

    from nmcli.commands.prune import run_prune

    pruned = root / "llama-2of4"
    if pruned.is_dir():
        return pruned
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(root / "llama", max_shard_size="200MB")
    run_prune(f"hf:{root / 'llama'}", pattern="2:4", input_shape="input_ids:1x16:int64", output=pruned)
    return pruned


def _load(mode: str, path: Path) -> tuple[torch.nn.Module, Any, Any, Any]:
    from nmcli.algorithms.srste import SparseTraining
    from nmcli.formats.open import load_checkpoint
    from nmcli.models.sources import model_from_checkpoint
    from nmcli.pipelines.distributed import shard_model
    from nmcli.pipelines.materialize import TensorRows, materialize, meta_model, read_stored

    stored = read_stored(path)
    assert stored is not None
    header = stored.header
    if mode == "meta":
        model = meta_model(header.meta, arch=None, trust=False)
        sparse = SparseTraining(model, header.meta.layers, stored.masks, refine_in_backward=False)
        shard_model(model, sparse, None, bf16=False, checkpointing=False)
        materialize(model, TensorRows(path), stored.masks, torch.device("cpu"), str(path))
        return model, sparse, header, stored.masks
    ckpt = load_checkpoint(path)  # what finetune holds for the run on the eager path
    model = model_from_checkpoint(ckpt, weights="dense")
    sparse = SparseTraining(model, ckpt.meta.layers, ckpt.masks, refine_in_backward=False)
    shard_model(model, sparse, None, bf16=False, checkpointing=False)
    return model, sparse, ckpt, ckpt.masks


def worker(args: argparse.Namespace) -> None:
    """One rank: load one way, write both ways (rank 0), report each phase's peak."""
    import torch.distributed as dist
    import transformers  # noqa: F401 - the baseline every rank pays before loading

    from nmcli.formats.checkpoint import Checkpoint, save_checkpoint
    from nmcli.pipelines.shardedout import drain, tied_aliases, write_directory

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    path = Path(args.path)
    report: dict[str, Any] = {"rank": rank, "load": args.load}
    before = _reset_peak()
    model, sparse, held, masks = _load(args.load, path)
    report.update(base_gib=before, load_peak_gib=_status("VmHWM"), after_load_gib=_status("VmRSS"))
    for mode in ("stream", "whole"):
        dist.barrier()
        start = _reset_peak()
        out = Path(args.out) / f"{args.load}-{mode}"
        if mode == "stream" and rank == 0:
            state, dense = sparse.iter_state(masks), sparse.iter_dense()
            write_directory(out, path, state, dense, masks, held.meta, skip=tied_aliases(model), inputs=[path])
        elif mode == "stream":
            drain(sparse.iter_state(masks, keep=False), sparse.iter_dense(keep=False))
        else:
            tensors, dense = sparse.state_dict(masks, keep=rank == 0), sparse.dense_weights(keep=rank == 0)
            if rank == 0:
                ckpt = Checkpoint(tensors=tensors, masks=dict(masks), meta=held.meta, dense=dense)
                save_checkpoint(ckpt, out.with_suffix(".safetensors"), force=True)
            del tensors, dense
        report[f"{mode}_start_gib"], report[f"{mode}_peak_gib"] = start, _status("VmHWM")
    report["parameters"] = sum(p.numel() for p in model.parameters())
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    if rank == 0:
        print(json.dumps({"ranks": reports}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _launch(args: argparse.Namespace, load: str, path: Path, out: Path) -> list[dict[str, Any]]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc), __file__,
        "--worker", "--load", load, "--path", str(path), "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        sys.exit(f"{load} run failed:\n{done.stderr[-3000:]}")
    reports: list[dict[str, Any]] = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))[
        "ranks"
    ]
    return reports


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| load | rank | baseline RSS GiB | load peak GiB (above baseline) | stream-write peak GiB (above start) "
        "| whole-write peak GiB (above start) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['load']} | {r['rank']} | {r['base_gib']:.2f} | {r['load_peak_gib']:.2f} "
            f"(+{r['load_peak_gib'] - r['base_gib']:.2f}) | {r['stream_peak_gib']:.2f} "
            f"(+{r['stream_peak_gib'] - r['stream_start_gib']:.2f}) | {r['whole_peak_gib']:.2f} "
            f"(+{r['whole_peak_gib'] - r['whole_start_gib']:.2f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load", choices=("meta", "eager", "both"), default="both")
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help="where the model and outputs go (default: a temporary folder)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="nmcli-fsdp-load-") as tmp:
        root = Path(args.folder or tmp)
        path = _prepare(args, root)
        rows = []
        for load in ("meta", "eager") if args.load == "both" else (args.load,):
            out = root / f"out-{load}"
            out.mkdir(exist_ok=True)
            rows += _launch(args, load, path, out)
        size = sum(f.stat().st_size for f in path.glob("model*.safetensors")) / GIB
    print(
        f"{rows[0]['parameters'] / 1e6:.0f}M parameters ({size:.2f} GiB of shards), {args.nproc} processes (gloo, CPU)"
    )
    print(_table(rows))


if __name__ == "__main__":
    main()

"""A synthetic Llama-architecture HF model directory in sharded bf16 safetensors, for timing nmcli on LLM-size checkpoints.

Writes ``config.json`` (``transformers.LlamaConfig``), the shards and
``model.safetensors.index.json`` itself, one shard at a time from tensors generated per decoder
layer (random normal weights scaled by ``fan_in ** -0.5``): the model is never held whole in
memory, the script's peak is about one shard. Then it times, each under ``/usr/bin/time -v``
(wall, user+sys CPU, peak RSS), with the files evicted from the page cache first
(``posix_fadvise(POSIX_FADV_DONTNEED)``, no root needed) unless ``--warm``:

1. ``cat SHARDS > /dev/null``: reading the input shards once;
2. ``nmcli prune DIR -p 2:4 -o OUT1``, then the same again into ``OUT2`` with ``--keep-dense``
   (two comparable 2:4 outputs of the same model; identical masks, so SAD is 0);
3. ``cat OUT1 shards + sidecar, OUT2 shards + sidecar > /dev/null`` and ``nmcli sad OUT1 OUT2``;
4. ``nmcli inspect OUT1 --strict``;

and deletes everything it wrote (``--keep`` keeps it)::

    python benchmarks/llm_scale.py --dir /work/llm-bench --size 7b
    python benchmarks/llm_scale.py --dir /work/llm-bench --size 1b
    python benchmarks/llm_scale.py --dir /work/llm-bench --size 7b --layers 2  # 7B tensor shapes, 2 layers
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sad_scale import evict  # the benchmarks' one page-cache eviction

# hidden, intermediate, layers, heads, kv heads, vocab
SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "7b": (4096, 11008, 32, 32, 32, 32000),  # Llama-2-7B's shapes: 6.74B parameters, 13.5 GB in bf16
    "1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B's shapes: 1.10B parameters, 2.2 GB in bf16
    "tiny": (256, 688, 2, 4, 4, 1000),  # a smoke test
}
SHARD_BYTES = 2 * 10**9  # save_pretrained(max_shard_size="2GB")


def config(size: str, layers: int | None = None) -> dict[str, Any]:
    from transformers import LlamaConfig

    hidden, inter, default_layers, heads, kv, vocab = SIZES[size]
    layers = layers or default_layers
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg.to_dict()


def tensor_shapes(size: str, layers: int | None = None) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The state dict's names and shapes, in groups written together: embeddings, each layer, the head."""
    hidden, inter, default_layers, heads, kv, vocab = SIZES[size]
    layers = layers or default_layers
    kv_dim = hidden // heads * kv
    groups = [[("model.embed_tokens.weight", (vocab, hidden))]]
    for i in range(layers):
        p = f"model.layers.{i}."
        groups.append(
            [
                (p + "self_attn.q_proj.weight", (hidden, hidden)),
                (p + "self_attn.k_proj.weight", (kv_dim, hidden)),
                (p + "self_attn.v_proj.weight", (kv_dim, hidden)),
                (p + "self_attn.o_proj.weight", (hidden, hidden)),
                (p + "mlp.gate_proj.weight", (inter, hidden)),
                (p + "mlp.up_proj.weight", (inter, hidden)),
                (p + "mlp.down_proj.weight", (hidden, inter)),
                (p + "input_layernorm.weight", (hidden,)),
                (p + "post_attention_layernorm.weight", (hidden,)),
            ]
        )
    groups.append([("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))])
    return groups


def _random(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm scales
        return torch.ones(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    rows = max(1, (1 << 24) // shape[1])  # float32 temporaries of at most 64 MB
    for start in range(0, shape[0], rows):
        chunk = torch.randn(min(rows, shape[0] - start), shape[1], generator=gen)
        out[start : start + rows] = chunk.mul_(shape[1] ** -0.5)
    return out


def write_model(folder: Path, size: str, layers: int | None = None, seed: int = 0) -> tuple[int, list[Path]]:
    """Write the model directory shard by shard; returns the parameter count and the shard paths."""
    from safetensors.torch import save_file

    groups = tensor_shapes(size, layers)
    plan: list[list[list[tuple[str, tuple[int, ...]]]]] = [[]]
    used = 0
    for group in groups:  # whole groups (decoder layers) per shard, like save_pretrained
        nbytes = sum(2 * int(torch.Size(s).numel()) for _, s in group)
        if plan[-1] and used + nbytes > SHARD_BYTES:
            plan.append([])
            used = 0
        plan[-1].append(group)
        used += nbytes
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config(size, layers), indent=2) + "\n")
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = params = 0
    paths = []
    for k, shard_groups in enumerate(plan, 1):
        name = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        state = {n: _random(s, gen) for group in shard_groups for n, s in group}
        save_file(state, str(folder / name), metadata={"format": "pt"})
        for n, v in state.items():
            weight_map[n] = name
            total += v.numel() * v.element_size()
            params += v.numel()
        del state
        paths.append(folder / name)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return params, paths


def timed(cmd: str) -> dict[str, Any]:
    """Run ``cmd`` under ``/usr/bin/time -v``: wall and CPU seconds, peak RSS (MiB), stdout."""
    proc = subprocess.run(["/usr/bin/time", "-v", "bash", "-c", cmd], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed ({proc.returncode}): {proc.stderr[-2000:]}")

    def field(label: str) -> str:
        found = re.search(re.escape(label) + r": (\S+)", proc.stderr)
        assert found, proc.stderr
        return found.group(1)

    wall = 0.0
    for part in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":"):
        wall = wall * 60 + float(part)
    return {
        "wall_s": wall,
        "user_s": float(field("User time (seconds)")),
        "sys_s": float(field("System time (seconds)")),
        "peak_rss_mib": int(field("Maximum resident set size (kbytes)")) / 1024,
        "stdout": proc.stdout,
    }


def _calibration_tokens(path: Path, sequences: int, length: int, vocab: int) -> None:
    """A ``tensors:`` calibration file of uniformly random token ids (a stand-in: the model is random too)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (sequences, length), generator=gen)
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, str(path))


def output_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/work/llm-bench"), help="scratch folder (deleted after)")
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument(
        "--warm", action="store_true", help="do not evict the files from the page cache before each run"
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="decoder layers (default: the size's own); fewer keeps every tensor shape, for peak memory and rates",
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument(
        "--second-pattern",
        default=None,
        help="prune OUT2 to this pattern instead of 2:4 --keep-dense (the full 7B with its dense copy needs ~55 GB of disk)",
    )
    parser.add_argument("--compress", action="store_true", help="also time `nmcli export OUT1 --compress`")
    parser.add_argument(
        "--calibrated",
        type=int,
        default=0,
        metavar="SEQUENCES",
        help="instead: time `prune --method sparsegpt` with this many random-token calibration sequences",
    )
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (--calibrated)")
    args = parser.parse_args()
    model, out1, out2 = args.dir / f"llama-{args.size}", args.dir / "out-2of4", args.dir / "out-2of4-dense"
    if args.dir.exists():
        raise SystemExit(f"{args.dir} exists: remove it or choose another --dir")
    rows: list[tuple[str, str, dict[str, Any]]] = []

    def measure(label: str, cmd: str, files: list[Path]) -> dict[str, Any]:
        if not args.warm:
            evict(*files)
        result = timed(cmd)
        rows.append((label, cmd, result))
        print(
            f"{label}: {result['wall_s']:.1f} s wall, {result['user_s']:.1f} + {result['sys_s']:.1f} s CPU, "
            f"peak RSS {result['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
        return result

    try:
        start = time.perf_counter()
        params, shards = write_model(model, args.size, args.layers)
        nbytes = sum(p.stat().st_size for p in shards)
        print(
            f"wrote {model}: {params / 1e9:.2f}B parameters, {len(shards)} shards, {nbytes / 1e9:.2f} GB "
            f"in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        quoted = " ".join(str(p) for p in shards)
        measure("read the input shards once", f"cat {quoted} > /dev/null", shards)
        if args.calibrated:
            calib = args.dir / "calib.safetensors"
            _calibration_tokens(calib, args.calibrated, args.seq_len, SIZES[args.size][5])
            measure(
                f"prune --method sparsegpt, {args.calibrated} x {args.seq_len} tokens",
                f"nmcli prune {model} -p 2:4 --method sparsegpt --calib tensors:{calib} "
                f"--calib-samples {args.calibrated} -o {out1}",
                shards,
            )
            print(
                json.dumps([{"what": w, "cmd": c, **{k: v for k, v in r.items() if k != "stdout"}} for w, c, r in rows])
            )
            return
        measure("prune -p 2:4", f"nmcli prune {model} -p 2:4 -o {out1}", shards)
        if args.second_pattern:
            second = f"prune -p {args.second_pattern}"
            measure(second, f"nmcli prune {model} -p {args.second_pattern} -o {out2}", shards)
        else:
            measure("prune -p 2:4 --keep-dense", f"nmcli prune {model} -p 2:4 --keep-dense -o {out2}", shards)
        outs = output_files(out1) + output_files(out2)
        measure("read both outputs once", f"cat {' '.join(map(str, outs))} > /dev/null", outs)
        sad = measure("sad OUT1 OUT2", f"nmcli sad {out1} {out2} --json", outs)
        print(sad["stdout"][:400])
        measure("inspect OUT1 --strict", f"nmcli inspect {out1} --strict", output_files(out1))
        side1, side2 = ((o / "nmcli.safetensors").stat().st_size / 1e6 for o in (out1, out2))
        print(f"sidecar nmcli.safetensors: {side1:.0f} MB; OUT2's: {side2:.0f} MB")
        if args.compress:
            shutil.rmtree(out2)  # disk room for the compressed copy
            packed = args.dir / "out-2of4-compressed"
            measure("export OUT1 --compress", f"nmcli export {out1} --compress -o {packed}", output_files(out1))
            size = sum(p.stat().st_size for p in packed.iterdir())
            print(f"compressed: {size / 1e9:.2f} GB, {100 * size / sum(p.stat().st_size for p in out1.iterdir()):.1f}%")
        print(json.dumps([{"what": w, "cmd": c, **{k: v for k, v in r.items() if k != "stdout"}} for w, c, r in rows]))
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()

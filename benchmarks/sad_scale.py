"""``nmcli sad`` at scale: two synthetic 2:4 nmcli/1 checkpoints of >= 1B fp16 parameters.

The two files are written on disk incrementally, one layer at a time and both at once, so
neither is ever held in memory: the script writes the safetensors layout itself (8-byte
little-endian header length, JSON header, raw little-endian tensor bytes) with the nmcli/1
metadata built by :mod:`nmcli.formats.checkpoint`, then checks the files with ``CheckpointReader``
(header, layer entries, and full validation of a few layers, streamed).

Checkpoint B re-draws the 2:4 pattern of a fraction (``--moved``) of A's groups; the expected SAD
is counted during generation from the 4-bit group patterns (a lookup table, independent of
``nmcli.pipelines.sad``) and compared with what ``nmcli sad`` reports.

Then it times, with ``/usr/bin/time -v`` (wall time and peak RSS):
* ``nmcli sad A B --json``, warm (files in the page cache) and cold (after evicting both files
  from the page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)``);
* ``cat A B > /dev/null``, the time to read both files once, warm and cold the same way;
* ``sad_report`` in-process (warm), without the interpreter and torch start-up, sampling the
  process's anonymous memory (RssAnon) apart from the mapped file pages it touched (RssFile).

Usage::

    python benchmarks/sad_scale.py --dir /work/sad-bench            # ~2.1 GB per file, deleted after
    python benchmarks/sad_scale.py --dir /tmp/x --layers 4 --dim 1024  # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from nmcli.formats.checkpoint import (
    FORMAT,
    MASK_PREFIX,
    CheckpointMeta,
    CheckpointReader,
    LayerEntry,
    SourceRef,
    history_record,
    validate_checkpoint,
)
from nmcli.nm.pattern import Pattern

# The six 2-of-4 group patterns as 4-bit nibbles (bit i = element i of the group, the
# little-endian bit order of nmcli's packed masks), and popcounts of 4-bit values.
PATTERNS_24 = np.array([0b0011, 0b0101, 0b1001, 0b0110, 0b1010, 0b1100], dtype=np.uint8)
POPCOUNT_4 = np.array([bin(v).count("1") for v in range(16)], dtype=np.int64)


def layer_names(layers: int) -> list[str]:
    return [f"layers.{i}.weight" for i in range(layers)]


def build_header(layers: int, dim: int, meta: CheckpointMeta) -> bytes:
    """The safetensors header (length prefix included) for ``layers`` fp16 [dim, dim] weights and their masks."""
    entries: dict[str, Any] = {
        "__metadata__": {"format": FORMAT, "nmcli": json.dumps(meta.to_json(), separators=(",", ":"))}
    }
    offset = 0
    weight_bytes, mask_bytes = dim * dim * 2, dim * dim // 8
    for name in layer_names(layers):
        entries[name] = {"dtype": "F16", "shape": [dim, dim], "data_offsets": [offset, offset + weight_bytes]}
        offset += weight_bytes
        entries[MASK_PREFIX + name] = {
            "dtype": "U8",
            "shape": [dim * dim // 8],
            "data_offsets": [offset, offset + mask_bytes],
        }
        offset += mask_bytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def write_pair(path_a: Path, path_b: Path, layers: int, dim: int, moved: float, seed: int) -> int:
    """Write checkpoints A and B layer by layer; return the expected SAD between them."""
    if dim % 8:
        raise SystemExit("--dim must be a multiple of 8")
    rng = np.random.default_rng(seed)
    entries = [LayerEntry(n, n.rsplit(".", 1)[0], 2, 4, 1, (dim, dim)) for n in layer_names(layers)]
    expected = 0
    groups = dim * dim // 4
    with open(path_a, "wb") as fa, open(path_b, "wb") as fb:
        for tag, fh in (("a", fa), ("b", fb)):
            meta = CheckpointMeta(
                source=SourceRef(spec=f"synthetic:sad_scale:{tag}"),
                pattern=Pattern(2, 4),
                layers=entries,
                method="synthetic",
                history=[
                    history_record(
                        "benchmarks/sad_scale.py", {"layers": layers, "dim": dim, "moved": moved, "seed": seed}
                    )
                ],
            )
            fh.write(build_header(layers, dim, meta))
        for i in range(layers):
            index_a = rng.integers(0, 6, groups, dtype=np.uint8)
            changed = rng.random(groups, dtype=np.float32) < moved
            index_b = index_a.copy()
            index_b[changed] = (index_a[changed] + rng.integers(1, 6, int(changed.sum()), dtype=np.uint8)) % 6
            nib_a, nib_b = PATTERNS_24[index_a], PATTERNS_24[index_b]
            expected += int(POPCOUNT_4[nib_a[changed] ^ nib_b[changed]].sum())
            weight = rng.standard_normal(dim * dim, dtype=np.float32).astype(np.float16)
            for nib, fh in ((nib_a, fa), (nib_b, fb)):
                packed = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)
                keep = np.unpackbits(packed, bitorder="little").view(bool)
                effective = np.where(keep, weight, np.float16(0.0))
                fh.write(effective.astype("<f2", copy=False).tobytes())
                fh.write(packed.tobytes())
            print(f"  wrote layer {i + 1}/{layers}", file=sys.stderr, end="\r")
    print(file=sys.stderr)
    return expected


def verify(path: Path, layers: int, dim: int, full_layers: int) -> None:
    """Open ``path`` with CheckpointReader and validate its header and ``full_layers`` layers fully."""
    with CheckpointReader(path) as reader:
        assert reader.meta is not None, f"{path} is not an nmcli checkpoint"
        assert len(reader.meta.layers) == layers and len(reader.mask_names) == layers
        picks = sorted({0, layers - 1, layers // 2})[:full_layers]
        for i in picks:
            entry = reader.meta.layers[i]
            meta = CheckpointMeta(source=reader.meta.source, pattern=reader.meta.pattern, layers=[entry])
            problems = validate_checkpoint(
                {entry.param: reader.tensor(entry.param)}, {entry.param: reader.packed_mask(entry.param)}, {}, meta
            )
            assert not problems, problems
            assert reader.shape(entry.param) == (dim, dim)


def evict(*paths: Path) -> None:
    """Drop the files' pages from the page cache (clean pages; no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(cmd: str) -> dict[str, Any]:
    """Run ``cmd`` under ``/usr/bin/time -v``: wall seconds, peak RSS (MiB), stdout."""
    proc = subprocess.run(["/usr/bin/time", "-v", "bash", "-c", cmd], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    assert wall and rss, proc.stderr
    seconds = 0.0
    for part in wall.group(1).split(":"):
        seconds = seconds * 60 + float(part)
    return {"wall_s": seconds, "peak_rss_mib": int(rss.group(1)) / 1024, "stdout": proc.stdout}


def _status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon and RssFile of this process, in MiB (Linux)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) // 1024
    return out


def probe(path_a: str, path_b: str) -> None:
    """In-process run of ``sad_report``: its own time (no interpreter start-up) and memory by kind.

    Samples /proc/self/status after every layer: RssAnon is the process's own memory, RssFile the
    pages of the memory-mapped files it has touched (page cache, dropped under memory pressure).
    """
    from nmcli.commands.sad import sad_report

    before = _status()
    peak: dict[str, int] = {}

    def sample(done: int, total: int, label: str) -> None:
        for key, value in _status().items():
            peak[key] = max(peak.get(key, 0), value)

    start = time.perf_counter()
    result = sad_report([path_a, path_b], progress=sample).pairs[0]
    seconds = time.perf_counter() - start
    print(
        json.dumps({"sad_report_s": round(seconds, 3), "after_import_mib": before, "peak_mib": peak, "sad": result.sad})
    )


def main() -> None:
    if sys.argv[1:2] == ["--probe"]:
        probe(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("sad-bench"), help="where the two files go")
    parser.add_argument("--layers", type=int, default=60, help="fp16 [dim, dim] layers per checkpoint")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--moved", type=float, default=0.05, help="share of groups whose kept pair B re-draws")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = parser.parse_args()

    params = args.layers * args.dim * args.dim
    file_bytes = params * 2 + params // 8
    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    if free < 2 * file_bytes + (2 << 30):
        raise SystemExit(f"need {2 * file_bytes / 2**30:.1f} GiB + 2 GiB spare in {args.dir}, {free / 2**30:.1f} free")
    path_a, path_b = args.dir / "sad-a.safetensors", args.dir / "sad-b.safetensors"
    nmcli = shutil.which("nmcli") or "nmcli"
    try:
        print(
            f"writing 2 x {params:,} fp16 parameters ({file_bytes / 1e9:.2f} GB per file) to {args.dir}",
            file=sys.stderr,
        )
        start = time.perf_counter()
        expected = write_pair(path_a, path_b, args.layers, args.dim, args.moved, args.seed)
        write_s = time.perf_counter() - start
        for path in (path_a, path_b):
            verify(path, args.layers, args.dim, full_layers=3)
        sad_cmd = f"{nmcli} sad {path_a} {path_b} --json"
        cat_cmd = f"cat {path_a} {path_b} > /dev/null"
        results: dict[str, list[dict[str, Any]]] = {k: [] for k in ("sad_cold", "cat_cold", "sad_warm", "cat_warm")}
        for _ in range(args.repeat):
            for key, cmd in (("sad_cold", sad_cmd), ("cat_cold", cat_cmd)):
                evict(path_a, path_b)
                results[key].append(timed(cmd))
            subprocess.run(["bash", "-c", cat_cmd], check=True)  # warm the cache
            for key, cmd in (("sad_warm", sad_cmd), ("cat_warm", cat_cmd)):
                results[key].append(timed(cmd))
        report = json.loads(results["sad_warm"][0]["stdout"])
        assert report["sad"] == expected, (report["sad"], expected)
        assert report["total"] == params
        startup = timed(f"{sys.executable} -c 'import nmcli.commands.sad'")
        probes = [
            json.loads(timed(f"{sys.executable} {Path(__file__).resolve()} --probe {path_a} {path_b}")["stdout"])
            for _ in range(args.repeat)
        ]
        summary = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "params_per_file": params,
            "file_bytes": path_a.stat().st_size,
            "write_both_s": round(write_s, 1),
            "sad": report["sad"],
            "expected_sad": expected,
            "normalized": report["normalized"],
            "import_nmcli_sad_s": startup["wall_s"],
            "import_nmcli_sad_peak_rss_mib": round(startup["peak_rss_mib"], 1),
            "in_process_warm": {
                "median_sad_report_s": statistics.median(p["sad_report_s"] for p in probes),
                "runs_sad_report_s": [p["sad_report_s"] for p in probes],
                "after_import_mib": probes[0]["after_import_mib"],
                "peak_mib": probes[0]["peak_mib"],
            },
            **{
                key: {
                    "median_wall_s": statistics.median(r["wall_s"] for r in runs),
                    "runs_wall_s": [r["wall_s"] for r in runs],
                    "max_peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1),
                }
                for key, runs in results.items()
            },
            "commands": {"sad": sad_cmd, "cat": cat_cmd},
        }
        print(json.dumps(summary, indent=2))
    finally:
        if not args.keep:
            for path in (path_a, path_b):
                path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()

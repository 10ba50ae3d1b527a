"""``nmcli bench``: time dense against sparse on torch, onnxruntime or TensorRT."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from nmcli.cli.app import emit_json, guarded, progress_bar, show_progress, stderr
from nmcli.cli.options import ArchOption, InputShapeOption, JsonOption, ModelClassOption, TrustOption

if TYPE_CHECKING:
    from nmcli.bench.types import BenchReport


TargetArgument = Annotated[
    str,
    typer.Argument(help="A checkpoint or model source (torch), an .onnx file (onnxruntime) or a TensorRT .engine."),
]
BackendOption = Annotated[
    str | None,
    typer.Option("--backend", help="torch, onnxruntime or tensorrt (default: from TARGET's file type)."),
]
DeviceOption = Annotated[
    str | None,
    typer.Option("--device", help="cpu, cuda (the current CUDA device) or cuda:N (default: cuda when available)."),
]
VsOption = Annotated[str | None, typer.Option("--vs", help="A second .onnx or engine file to compare against TARGET.")]
BatchSizeOption = Annotated[
    str | None, typer.Option("--batch-size", help="Batch sizes to sweep, e.g. 1,8,32 (default: the input spec's).")
]
PrecisionOption = Annotated[
    str | None,
    typer.Option("--precision", help="fp32, fp16 or bf16 for the torch backend (default: fp16 on CUDA, fp32 on CPU)."),
]
WarmupOption = Annotated[int, typer.Option("--warmup", help="Untimed iterations before timing.")]
ItersOption = Annotated[int | None, typer.Option("--iters", help="Timed iterations (default 50).")]
MinTimeOption = Annotated[
    float | None, typer.Option("--min-time", help="Time for at least this many seconds instead of --iters.")
]
CompileOption = Annotated[bool, typer.Option("--compile", help="Run both torch variants under torch.compile.")]
OutputOption = Annotated[str | None, typer.Option("--output", "-o", help="Also write the JSON result to this file.")]
ForceOutputOption = Annotated[bool, typer.Option("--force", help="Overwrite an existing --output file.")]


@guarded
def command(
    target: TargetArgument,
    backend: BackendOption = None,
    device: DeviceOption = None,
    vs: VsOption = None,
    batch_size: BatchSizeOption = None,
    input_shape: InputShapeOption = None,
    precision: PrecisionOption = None,
    warmup: WarmupOption = 10,
    iters: ItersOption = None,
    min_time: MinTimeOption = None,
    compile: CompileOption = False,
    arch: ArchOption = None,
    model_class: ModelClassOption = "auto",
    trust: TrustOption = False,
    output: OutputOption = None,
    force: ForceOutputOption = False,
    json_output: JsonOption = False,
) -> None:
    """Benchmark TARGET: its dense model against its sparse one, or one file against another (--vs).

    Latency percentiles (p50/p90/p99/mean) from per-iteration samples after warm-up, throughput,
    peak device memory, and the dense/sparse p50 ratio with its 95% interval. On a CUDA GPU in fp16/bf16, the
    sparse torch variant runs 2:4 Linear layers on semi-structured sparse kernels (cuSPARSELt on
    compute capability >= 8.0, CUTLASS on 8.x), and its outputs are checked against dense kernels
    (exit 1 if they disagree); elsewhere it runs masked weights with dense kernels, and says so.
    """
    from nmcli.commands.bench import run_bench
    from nmcli.errors import CheckFailedError
    from nmcli.trust import remember_command_line

    remember_command_line([target, arch], trust=trust)  # the user's own code: later rebuilds may run it
    with progress_bar("benchmarking", show_progress(json_output)) as update:
        report = run_bench(
            target,
            backend=backend,
            device=device,
            vs=vs,
            batch_sizes=batch_size,
            input_shape=input_shape,
            precision=precision,
            warmup=warmup,
            iters=iters,
            min_time=min_time,
            compile=compile,
            arch=arch,
            trust=trust,
            model_class=model_class,
            output=output,
            force=force,
            progress=update,
        )
    if json_output:
        emit_json(report.to_json())
    else:
        _render(report)
    if not report.agreement_ok:
        bad = [a for a in report.agreement if not a["ok"]]
        worst = max((a["max_abs_diff"] or float("inf")) for a in bad)
        raise CheckFailedError(
            f"the sparse kernel's outputs differ from dense kernels on the same weights (max abs diff {worst:.3g}, "
            f"tolerance {bad[0]['tolerance']:.3g}): its timings are not to be trusted"
        )


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _ms(value: float) -> str:
    """Milliseconds with 3 significant digits (0.0257, 1.23, 23.9, 1234)."""
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def _render(report: BenchReport) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    plan = report.plan
    title = f"bench {report.target} ({plan.backend}, {plan.device}, {plan.precision}; latency in ms)"
    table = Table(title=escape(title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for name, justify in (
        ("variant", "left"),
        ("batch", "right"),
        ("p50", "right"),
        ("p90", "right"),
        ("p99", "right"),
        ("mean", "right"),
        ("samples/s", "right"),
        ("peak MB", "right"),
        ("2:4", "left"),
        ("p50 ratio [95%]", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    speedups = {(s["variant"], s["batch_size"]): s for s in report.speedup}
    for row in report.results:
        ratio = speedups.get((row.variant, row.batch_size))
        value = next(
            (v for k, v in (ratio or {}).items() if k.endswith(f"_over_{(ratio or {}).get('baseline')}")), None
        )
        kernel = {True: "[green]yes[/green]", False: "no", None: "?"}[row.sparse_kernel]
        table.add_row(
            row.variant,
            str(row.batch_size),
            _ms(row.stats.p50),
            _ms(row.stats.p90),
            _ms(row.stats.p99),
            _ms(row.stats.mean),
            f"{row.throughput:,.0f}",
            _fmt(row.peak_memory_mb, 1) or "n/a",
            kernel,
            _ratio_cell(value, (ratio or {}).get("ratio_interval")),
        )
    if stderr.is_terminal:
        stderr.print(table)
    else:  # logs and pipes: rich would squeeze the table into 80 columns and cut the numbers
        from rich.console import Console

        Console(stderr=True, highlight=False, width=120).print(table)
    for check in report.agreement:
        ok = "[green]agree[/green]" if check["ok"] else "[red]DISAGREE[/red]"
        stderr.print(
            f"{check['variant']} batch {check['batch_size']}: outputs vs dense kernels on the same weights {ok} "
            f"(max abs diff {_fmt(check['max_abs_diff'], 5)}, tolerance {_fmt(check['tolerance'], 5)})"
        )
    for pair in report.speedup:
        stderr.print(_ratio_line(pair, report.plan.device), highlight=False)
    for note in report.notes:
        style = "bold yellow" if note.startswith("no sparse kernel") else "yellow"
        stderr.print(f"[{style}]note:[/{style}] {escape(note)}")
    env = report.environment
    where = env.get("gpu") or env.get("cpu")
    stderr.print(
        f"[dim]{escape(str(where))} · torch {env.get('torch')} ({env.get('torch_threads')} threads) · "
        f"onnxruntime {env.get('onnxruntime')} · tensorrt {env.get('tensorrt')} · load {env.get('load_average')} · "
        f"2:4 = a 2:4 sparse kernel ran · p50 ratio = baseline p50 / variant p50 (> 1: the variant is faster), "
        f"[95%] its bootstrap interval over the iterations[/dim]"
    )
    if report.output:
        stderr.print(f"wrote {escape(str(report.output))}")


def _ratio_cell(value: float | None, bounds: list[float] | None) -> str:
    if not isinstance(value, float):
        return ""
    return f"{value:.2f}x" + (f" [{bounds[0]:.2f}-{bounds[1]:.2f}]" if bounds else "")


def _ratio_line(pair: dict[str, Any], device: str) -> str:
    """One plain sentence per compared pair: the measured ratio with its spread, and what it means.
    "speed-up" only when a sparse kernel ran and the interval lies above 1.0."""
    base, other, bs = pair["baseline"], pair["variant"], pair["batch_size"]
    value = pair.get(f"{other}_over_{base}")
    if not isinstance(value, float):
        return f"{other} vs {base}, batch {bs}: no ratio (a p50 of 0)"
    bounds = pair.get("ratio_interval")
    spread = f" (95% interval {bounds[0]:.2f}-{bounds[1]:.2f})" if bounds else " (too few iterations for an interval)"
    measured = f"{other} vs {base}, batch {bs}: p50 ratio {value:.2f}x{spread}"
    if (base, other) != ("dense", "sparse") or pair.get("sparse_kernel") is None:
        verdict = "differs from 1.0 beyond the spread" if pair.get("differs_from_1") else "within the spread of 1.0"
        return f"{measured}: {verdict}"
    if not pair.get("sparse_kernel"):
        where = "CPU has no 2:4 sparse kernel" if device.startswith("cpu") else "no 2:4 sparse kernel ran"
        tail = (
            "the difference is not from sparsity"
            if pair.get("differs_from_1")
            else "the same as dense, within the spread"
        )
        return f"{measured}: {where}, both ran dense kernels; {tail}"
    if pair.get("differs_from_1") and bounds and bounds[0] > 1.0:
        return f"{measured}: a 2:4 kernel ran; speed-up {value:.2f}x beyond the spread"
    return f"{measured}: a 2:4 kernel ran; no speed-up beyond the spread"

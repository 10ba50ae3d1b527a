"""``nmcli export``: ONNX with visible, verified N:M sparsity; TensorRT engines; compressed checkpoints."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from nmcli.cli.app import emit_json, esc, guarded, progress_bar, show_progress, stderr
from nmcli.cli.options import (
    ArchOption,
    InputShapeOption,
    JsonOption,
    ModelClassOption,
    TrustOption,
    number_option,
)

if TYPE_CHECKING:
    from nmcli.commands.export import ExportResult


CheckpointArgument = Annotated[str, typer.Argument(help="An nmcli checkpoint (.safetensors), or any model source.")]
OnnxOption = Annotated[bool, typer.Option("--onnx", help="Export ONNX (the default when nothing else is asked).")]
TrtOption = Annotated[bool, typer.Option("--trt", help="Also build a TensorRT engine (needs the tensorrt package).")]
SparseOption = Annotated[
    bool,
    typer.Option("--sparse/--no-sparse", help="Let TensorRT use 2:4 sparse kernels (BuilderFlag.SPARSE_WEIGHTS)."),
]
PrecisionOption = Annotated[
    str,
    typer.Option(
        "--precision",
        help="fp32, fp16 or bf16 (ONNX weights in that dtype, zeros exact); int8 or fp8: a Q/DQ ONNX calibrated "
        "on --calib data (2:4 kept in the quantized weights).",
    ),
]
CalibOption = Annotated[
    str | None,
    typer.Option("--calib", help="Calibration data for --precision int8/fp8 (any --calib spec of nmcli prune)."),
]
CalibSamplesOption = Annotated[
    int, number_option("--calib-samples", help="Calibration examples (int8/fp8).", minimum=1, maximum=1e7)
]
CalibMethodOption = Annotated[
    str,
    typer.Option("--calib-method", help="Activation ranges: max (default), percentile or entropy."),
]
DynamicBatchOption = Annotated[
    bool,
    typer.Option("--dynamic-batch", help="Dynamic batch dimension (and sequence length for text models)."),
]
OpsetOption = Annotated[int | None, number_option("--opset", help="ONNX opset (default 17).", minimum=9, maximum=23)]
VerifyOption = Annotated[
    bool, typer.Option("--verify/--no-verify", help="Compare onnxruntime with torch on random inputs.")
]
AtolOption = Annotated[
    float | None,
    number_option("--atol", help="Absolute tolerance (default per precision).", minimum=0, maximum=1e6),
]
RtolOption = Annotated[
    float | None,
    number_option("--rtol", help="Relative tolerance (default per precision).", minimum=0, maximum=1e6),
]
WorkspaceOption = Annotated[
    int | None,
    number_option("--workspace", help="TensorRT workspace limit in MiB.", minimum=0, exclusive=True, maximum=1 << 24),
]
CompressOption = Annotated[
    bool,
    typer.Option("--compress", help="Write a compressed copy of the checkpoint (kept values + in-group indices)."),
]
OutputOption = Annotated[
    str | None,
    typer.Option(
        "-o",
        "--output",
        help="Output .onnx (or .engine with --trt; .safetensors with --compress alone, a directory for a sharded one).",
    ),
]
ForceOutputsOption = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")]
FormatOption = Annotated[
    str,
    typer.Option(
        "--format",
        help="onnx (default); plain: the weights as a plain safetensors state dict (-o OUT.safetensors); "
        "hf: a plain transformers folder (-o DIR). plain and hf keep the exact zeros and no nmcli records.",
    ),
]


@guarded
def command(
    checkpoint: CheckpointArgument,
    onnx: OnnxOption = False,
    trt: TrtOption = False,
    sparse: SparseOption = False,
    precision: PrecisionOption = "fp32",
    calib: CalibOption = None,
    calib_samples: CalibSamplesOption = 128,
    calib_method: CalibMethodOption = "max",
    input_shape: InputShapeOption = None,
    dynamic_batch: DynamicBatchOption = False,
    opset: OpsetOption = None,
    verify: VerifyOption = True,
    atol: AtolOption = None,
    rtol: RtolOption = None,
    workspace: WorkspaceOption = None,
    compress: CompressOption = False,
    output: OutputOption = None,
    force: ForceOutputsOption = False,
    arch: ArchOption = None,
    model_class: ModelClassOption = "auto",
    trust: TrustOption = False,
    fmt: FormatOption = "onnx",
    json_output: JsonOption = False,
) -> None:
    """Export CHECKPOINT to ONNX (pruned layers checked to stay N:M, verified in onnxruntime) and TensorRT.

    Exit codes: 1 when verification finds a difference outside --atol/--rtol; 3 when --trt is asked
    without the tensorrt package (the ONNX is still written and the equivalent trtexec command printed),
    or when torch cannot export a model that runs in torch (the exporters' own output goes to stderr).
    """
    from nmcli.commands.export import run_export
    from nmcli.errors import ExportUnsupportedError
    from nmcli.trust import remember_command_line

    remember_command_line([checkpoint, arch], trust=trust)
    if fmt != "onnx":  # issue 23: the weights alone (export_plain), apart from the ONNX/TensorRT path
        _export_plain(checkpoint, fmt, output=output, force=force, arch=arch, json_output=json_output,
                      others={"--onnx": onnx, "--trt": trt, "--compress": compress, "--dynamic-batch": dynamic_batch,
                              "--input-shape": input_shape is not None, "--precision": precision != "fp32",
                              "--model-class": model_class != "auto"})  # fmt: skip
        return
    if calib is not None:
        from nmcli.models.data import check_data_spec

        check_data_spec(calib, "--calib")

    with progress_bar("exporting", show_progress(json_output)) as update, _exporter_output(ExportUnsupportedError):
        result = run_export(
            checkpoint,
            onnx=onnx,
            trt=trt,
            sparse=sparse,
            precision=precision,
            input_shape=input_shape,
            dynamic_batch=dynamic_batch,
            opset=opset,
            verify=verify,
            atol=atol,
            rtol=rtol,
            workspace_mb=workspace,
            compress=compress,
            output=output,
            force=force,
            progress=update,
            arch=arch,
            trust=trust,
            calib=calib,
            calib_samples=calib_samples,
            calib_method=calib_method,
            model_class=model_class,
        )
    if json_output:
        emit_json(result.to_json())
    else:
        _render(result)
    for note in result.notes:
        stderr.print(f"[cyan]note:[/cyan] {esc(note)}", markup=True, highlight=False)
    for warning in result.warnings:
        stderr.print(f"[yellow]warning:[/yellow] {esc(warning)}", markup=True, highlight=False)
    _render_trtexec(result)
    result.raise_for_status()


def _export_plain(
    checkpoint: str,
    fmt: str,
    *,
    output: str | None,
    force: bool,
    arch: str | None,
    json_output: bool,
    others: dict[str, bool],
) -> None:
    """``--format plain|hf``: :func:`nmcli.commands.export_plain.run_plain_export`, and its one line."""
    from nmcli.commands.export_plain import PLAIN_FORMATS, run_plain_export
    from nmcli.errors import InputError

    if fmt not in PLAIN_FORMATS:
        raise InputError(f"--format {fmt}: choose onnx, plain or hf")
    given = [name for name, on in others.items() if on]
    if given:
        raise InputError(f"--format {fmt} writes the weights only: drop {given[0]} (it is for --format onnx)")
    with progress_bar("writing", show_progress(json_output)) as update:
        result = run_plain_export(checkpoint, fmt=fmt, output=output, force=force, arch=arch, progress=update)
    if json_output:
        emit_json(result.to_json())
        return
    what = "plain state dict" if fmt == "plain" else "transformers folder"
    stderr.print(
        f"{what} -> [bold]{esc(str(result.path))}[/bold]: {result.tensors} tensors, {result.pruned_layers} "
        f"N:M-pruned layers with their exact zeros; no nmcli records",
        highlight=False,
    )


def _render_trtexec(result: ExportResult) -> None:
    """Without tensorrt installed: the trtexec commands that build the same engine."""
    if result.trt_missing is None or result.trtexec is None:
        return
    from nmcli.commands.export import trtexec_variants

    plain, strongly = trtexec_variants(result.trtexec)
    stderr.print("tensorrt is not installed; the same engine with trtexec (TensorRT 8-10):", highlight=False)
    stderr.print(f"  {plain}", markup=False, highlight=False)
    stderr.print("TensorRT 11 (strongly typed, precision from the ONNX):", highlight=False)
    stderr.print(f"  {strongly}", markup=False, highlight=False)


def _render(result: ExportResult) -> None:
    from rich.markup import escape
    from rich.table import Table

    if result.compressed_bytes is not None and result.original_bytes:
        stderr.print(
            f"compressed checkpoint -> [bold]{escape(str(result.paths.compressed))}[/bold] "
            f"({result.compressed_bytes:,} bytes, {100 * result.compressed_bytes / result.original_bytes:.1f}% of "
            f"{result.original_bytes:,})"
        )
    if result.onnx is None:
        return
    if result.matches:
        table = Table(title="pruned layers in the ONNX graph", title_justify="left")
        table.add_column("layer")
        table.add_column("initializer")
        table.add_column("op")
        table.add_column("axis", justify="right")
        table.add_column("status")
        for m in result.matches:
            status = "[green]N:M[/green]" if not m.lost else f"[red]lost[/red]: {escape(m.reason)}"
            table.add_row(
                escape(m.param),
                escape(m.initializer or "-"),
                m.op_type or "-",
                str(m.axis) if m.axis >= 0 else "-",
                status,
            )
        stderr.print(table)
    kept = len(result.matches) - len(result.lost_layers)
    data = f" + {result.onnx.data_path}" if result.onnx.data_path else ""
    stderr.print(
        f"ONNX ({result.onnx.exporter} exporter, opset {result.onnx.opset}, {result.precision}) -> "
        f"[bold]{escape(str(result.onnx.path))}{escape(data)}[/bold]; {kept} of {len(result.matches)} pruned layers are N:M initializers"
    )
    if result.verify is not None:
        v = result.verify
        if not v.skipped:  # a skipped verification is reported with the warnings
            verdict = "[green]passed[/green]" if v.passed else "[red]FAILED[/red]"
            stderr.print(f"onnxruntime vs torch {verdict}: {escape(v.summary())}")
    if result.quantized is not None:
        q = result.quantized
        kept = sum(1 for layer in q.layers if layer.compliant)
        stderr.print(
            f"{q.precision} Q/DQ ({q.method} calibration, {q.calibration_examples} batch(es)): {len(q.quantized_nodes)} "
            f"node(s) quantized, {kept} of {len(q.layers)} pruned layers N:M in their quantized weights; "
            f"vs the float sparse model: {escape(q.check.summary())}"
        )
    if result.engine is not None:
        e = result.engine
        stderr.print(
            f"TensorRT {e.trt_version} engine -> [bold]{escape(str(e.path))}[/bold] "
            f"(flags {', '.join(e.settings.flags) or 'none'}); eligible for sparse math: {len(e.eligible)}, "
            f"sparse kernels picked: {len(e.picked)}"
        )
        if e.layers:
            table = Table(title="TensorRT and the pruned layers", title_justify="left")
            table.add_column("layer")
            table.add_column("ONNX node")
            table.add_column("eligible")
            table.add_column("sparse kernel")
            for row in e.layers:
                table.add_row(
                    escape(row["param"]),
                    escape(row["node"]),
                    "yes" if row["eligible"] else "no",
                    {True: "yes", False: "no"}.get(row["sparse_kernel"], "fused (Myelin): not attributable"),
                )
            stderr.print(table)


@contextmanager
def _exporter_output(error: type[Exception]) -> Iterator[None]:
    """On an export failure, show the output the exporters printed (captured off stdout) on stderr."""
    try:
        yield
    except error as exc:
        text = getattr(exc, "exporter_output", "")
        if text:
            sys.stderr.write(text if text.endswith("\n") else text + "\n")
        raise

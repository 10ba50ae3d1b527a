"""``nmcli prune``: prune a model to N:M and write an nmcli/1 checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from nmcli.cli.app import emit_json, esc, guarded, progress_bar, show_progress, stderr
from nmcli.cli.options import (
    DATA_SPECS,
    ArchOption,
    ForceOption,
    JsonOption,
    ModelClassOption,
    TrustOption,
    number_option,
)

if TYPE_CHECKING:
    from nmcli.pipelines.inmemory import PruneResult


ModelArgument = Annotated[
    str,
    typer.Argument(help="Model source: file.safetensors|.pt|.pth|.pt2, hf:, torchvision:, timm:, py:module:factory."),
]
PatternOption = Annotated[
    str, typer.Option("-p", "--pattern", help="N:M pattern (0 < N < M <= 32); only 2:4 is accelerated.")
]
MethodOption = Annotated[
    str, typer.Option("--method", help="magnitude (no data), wanda or sparsegpt (both need --calib).")
]
CalibOption = Annotated[str | None, typer.Option("--calib", help=f"Calibration data: {DATA_SPECS}.")]
CalibSamplesOption = Annotated[
    int, number_option("--calib-samples", help="Calibration examples to use.", minimum=1, maximum=1e7)
]
MaxLengthOption = Annotated[
    int,
    number_option("--max-length", help="Token limit per line of text: calibration data.", minimum=1, maximum=1e6),
]
DampOption = Annotated[
    float,
    number_option(
        "--damp", help="SparseGPT dampening, a fraction of the mean Hessian diagonal.", minimum=0, maximum=10
    ),
]
BlockSizeOption = Annotated[
    int,
    number_option(
        "--block-size",
        help="SparseGPT column block (rounded down to a multiple of M, at least M).",
        minimum=1,
        maximum=1e6,
    ),
]
RefitOption = Annotated[
    bool,
    typer.Option(
        "--refit/--no-refit",
        help="After SparseGPT, re-solve the kept weights to the least-squares optimum of each layer's output.",
    ),
]
NoBnRecalibrateOption = Annotated[
    bool,
    typer.Option("--no-bn-recalibrate", help="Keep BatchNorm running statistics as they are (no re-estimation)."),
]
DeviceOption = Annotated[str, typer.Option("--device", help="Where calibrated pruning runs: cpu, cuda or cuda:N.")]
IncludeOption = Annotated[
    list[str] | None, typer.Option("--include", help="Prune only modules matching this glob (repeatable).")
]
ExcludeOption = Annotated[
    list[str] | None, typer.Option("--exclude", help="Leave modules matching this glob dense (repeatable).")
]
StoredShapeOption = Annotated[
    str | None, typer.Option("--input-shape", help="Input spec stored for later commands, e.g. 1x3x224x224.")
]
InferLayersOption = Annotated[
    bool,
    typer.Option(
        "--infer-layers",
        help="Prune a bare state dict without --arch: its layers are inferred from the tensors (magnitude only).",
    ),
]
KeepDenseOption = Annotated[
    bool,
    typer.Option("--keep-dense", help="Store the dense weights of pruned layers (for SR-STE fine-tuning)."),
]
OutputOption = Annotated[
    str | None,
    typer.Option("-o", "--output", help="Output checkpoint (default: MODEL-NofM.safetensors beside the input)."),
]


@guarded
def command(
    model: ModelArgument,
    pattern: PatternOption = "2:4",
    method: MethodOption = "magnitude",
    calib: CalibOption = None,
    calib_samples: CalibSamplesOption = 128,
    max_length: MaxLengthOption = 128,
    damp: DampOption = 0.01,
    block_size: BlockSizeOption = 128,
    refit: RefitOption = True,
    no_bn_recalibrate: NoBnRecalibrateOption = False,
    device: DeviceOption = "cpu",
    include: IncludeOption = None,
    exclude: ExcludeOption = None,
    arch: ArchOption = None,
    model_class: ModelClassOption = "auto",
    trust: TrustOption = False,
    input_shape: StoredShapeOption = None,
    infer_layers: InferLayersOption = False,
    keep_dense: KeepDenseOption = False,
    output: OutputOption = None,
    force: ForceOption = False,
    json_output: JsonOption = False,
) -> None:
    """Prune MODEL to N:M sparsity and write an nmcli/1 checkpoint.

    Every Linear, ConvNd (groups=1), attention projection and transformers Conv1D whose input
    dimension is a multiple of M is pruned along its input dimension; every skipped layer is listed
    with its reason. `--method magnitude` keeps the N largest magnitudes of every M. `wanda` and
    `sparsegpt` (which also updates the kept weights) use `--calib` data and run block by block,
    each block fed by the already-pruned blocks before it. With calibration data, BatchNorm running
    statistics are re-estimated after pruning (`--no-bn-recalibrate` turns it off).
    """
    from nmcli.commands.prune import calibration_config, run_prune
    from nmcli.nm.pattern import parse_pattern, pattern_note
    from nmcli.trust import remember_command_line

    remember_command_line([model, arch], trust=trust)  # the user's own code: later rebuilds may run it
    calibration = calibration_config(
        calib,
        samples=calib_samples,
        max_length=max_length,
        damp=damp,
        block_size=block_size,
        refit=refit,
        bn_recalibrate=not no_bn_recalibrate,
        device=device,
    )
    with progress_bar("pruning", show_progress(json_output)) as update:
        result = run_prune(
            model,
            pattern=pattern,
            method=method,
            calibration=calibration,
            include=include or [],
            exclude=exclude or [],
            arch=arch,
            trust=trust,
            input_shape=input_shape,
            keep_dense=keep_dense,
            output=output,
            force=force,
            infer_layers=infer_layers,
            progress=update,
            model_class=model_class,
        )
    _render(result)
    for line in result.notes:
        stderr.print(f"[dim]note:[/dim] {esc(line)}")
    note = pattern_note(parse_pattern(pattern))
    if note:
        stderr.print(f"[yellow]note:[/yellow] {note}")
    if json_output:
        emit_json(result.to_json())


def _render(result: PruneResult) -> None:
    from rich.table import Table

    table = Table(title=f"prune {result.pattern} ({result.method})", title_justify="left")
    table.add_column("layer")
    table.add_column("shape")
    table.add_column("status")
    table.add_column("reason")
    table.add_column("kept |w| %", justify="right")
    calibrated = any(layer.recon_error is not None for layer in result.layers)
    if calibrated:
        table.add_column("recon err %", justify="right")
    for layer in result.layers:
        status = "[green]pruned[/green]" if layer.status == "pruned" else "[dim]skipped[/dim]"
        kept = f"{100 * layer.kept_magnitude:.1f}" if layer.kept_magnitude is not None else ""
        reason = layer.reason or layer.note
        row = [esc(layer.param), "x".join(map(str, layer.shape)), status, esc(reason), kept]
        if calibrated:
            row.append(f"{100 * layer.recon_error:.2f}" if layer.recon_error is not None else "")
        table.add_row(*row)
    stderr.print(table)
    pruned = sum(1 for layer in result.layers if layer.status == "pruned")
    stderr.print(
        f"pruned {pruned} of {len(result.layers)} layers to {result.pattern}: {result.params_pruned:,} of "
        f"{result.params_total:,} parameters zeroed ({100 * result.sparsity:.1f}% sparsity) -> [bold]{esc(str(result.output))}[/bold]"
    )
    if result.bn_recalibrated:
        stderr.print(f"BatchNorm running statistics re-estimated on {result.calib_samples} calibration samples")

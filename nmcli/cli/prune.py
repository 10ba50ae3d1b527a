"""``nmcli prune``: prune a model to N:M and write an nmcli/1 checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from nmcli.cli.app import emit_json, esc, guarded, progress_bar, show_progress, stderr
from nmcli.cli.options import number

if TYPE_CHECKING:
    from nmcli.pipelines.inmemory import PruneResult


@guarded
def command(
    model: str = typer.Argument(
        ..., help="Model source: file.safetensors|.pt|.pth|.pt2, hf:, torchvision:, timm:, py:module:factory."
    ),
    pattern: str = typer.Option(
        "2:4", "-p", "--pattern", help="N:M pattern (0 < N < M <= 32); only 2:4 is accelerated."
    ),
    method: str = typer.Option(
        "magnitude", "--method", help="magnitude (no data), wanda or sparsegpt (both need --calib)."
    ),
    calib: str | None = typer.Option(
        None,
        "--calib",
        help="Calibration data: tensors:FILE.safetensors, text:FILE.txt, imagefolder:DIR or py:module:callable.",
    ),
    calib_samples: int = typer.Option(
        128,
        "--calib-samples",
        help="Calibration examples to use.",
        callback=number("--calib-samples", minimum=1, maximum=1e7),
    ),
    max_length: int = typer.Option(
        128,
        "--max-length",
        help="Token limit per line of text: calibration data.",
        callback=number("--max-length", minimum=1, maximum=1e6),
    ),
    damp: float = typer.Option(
        0.01,
        "--damp",
        help="SparseGPT dampening, a fraction of the mean Hessian diagonal.",
        callback=number("--damp", minimum=0, maximum=10),
    ),
    block_size: int = typer.Option(
        128,
        "--block-size",
        help="SparseGPT column block (rounded down to a multiple of M, at least M).",
        callback=number("--block-size", minimum=1, maximum=1e6),
    ),
    refit: bool = typer.Option(
        True,
        "--refit/--no-refit",
        help="After SparseGPT, re-solve the kept weights to the least-squares optimum of each layer's output.",
    ),
    no_bn_recalibrate: bool = typer.Option(
        False, "--no-bn-recalibrate", help="Keep BatchNorm running statistics as they are (no re-estimation)."
    ),
    device: str = typer.Option("cpu", "--device", help="Where calibrated pruning runs: cpu, cuda or cuda:N."),
    include: list[str] = typer.Option([], "--include", help="Prune only modules matching this glob (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Leave modules matching this glob dense (repeatable)."),
    arch: str | None = typer.Option(
        None, "--arch", help="Architecture source for a plain state dict, or to override a checkpoint's source."
    ),
    trust: bool = typer.Option(
        False,
        "--trust",
        help="Run code a file holds: a pickled nn.Module, or a checkpoint's recorded py:/pickled source (only for authors you trust).",
    ),
    input_shape: str | None = typer.Option(
        None, "--input-shape", help="Input spec stored for later commands, e.g. 1x3x224x224."
    ),
    infer_layers: bool = typer.Option(
        False,
        "--infer-layers",
        help="Prune a bare state dict without --arch: its layers are inferred from the tensors (magnitude only).",
    ),
    keep_dense: bool = typer.Option(
        False, "--keep-dense", help="Store the dense weights of pruned layers (for SR-STE fine-tuning)."
    ),
    output: str | None = typer.Option(
        None, "-o", "--output", help="Output checkpoint (default: MODEL-NofM.safetensors beside the input)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Prune MODEL to N:M sparsity and write an nmcli/1 checkpoint.

    Every Linear, ConvNd (groups=1), attention projection and transformers Conv1D whose input
    dimension is a multiple of M is pruned along its input dimension; every skipped layer is listed
    with its reason. `--method magnitude` keeps the N largest magnitudes of every M. `wanda` and
    `sparsegpt` (which also updates the kept weights) use `--calib` data and run block by block,
    each block fed by the already-pruned blocks before it. With calibration data, BatchNorm running
    statistics are re-estimated after pruning (`--no-bn-recalibrate` turns it off).
    """
    from nmcli.algorithms.config import DEFAULT_REFIT_ITERATIONS, CalibrationConfig
    from nmcli.commands.prune import run_prune
    from nmcli.nm.pattern import parse_pattern, pattern_note
    from nmcli.trust import remember_command_line

    remember_command_line([model, arch], trust=trust)  # the user's own code: later rebuilds may run it

    calibration = None
    if calib is not None:
        calibration = CalibrationConfig(
            spec=calib,
            samples=calib_samples,
            max_length=max_length,
            damp=damp,
            block_size=block_size,
            bn_recalibrate=not no_bn_recalibrate,
            device=_device(device),
            refit_iterations=DEFAULT_REFIT_ITERATIONS if refit else 0,
        )
    with progress_bar("pruning", show_progress(json_output)) as update:
        result = run_prune(
            model,
            pattern=pattern,
            method=method,
            calibration=calibration,
            include=include,
            exclude=exclude,
            arch=arch,
            trust=trust,
            input_shape=input_shape,
            keep_dense=keep_dense,
            output=output,
            force=force,
            infer_layers=infer_layers,
            progress=update,
        )
    _render(result)
    for line in result.notes:
        stderr.print(f"[dim]note:[/dim] {esc(line)}")
    note = pattern_note(parse_pattern(pattern))
    if note:
        stderr.print(f"[yellow]note:[/yellow] {note}")
    if json_output:
        emit_json(result.to_json())


def _device(name: str) -> str:
    """``--device``: cpu, cuda or cuda:N, with CUDA present (exit 3 otherwise)."""
    from nmcli.errors import BackendUnavailableError, InputError

    if name == "cpu":
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailableError(f"--device {name}: no CUDA device is available: use --device cpu")
        return "cuda:0" if name == "cuda" else name
    raise InputError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N")


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

"""``nmcli prune``: prune a model to N:M and write an nmcli/1 checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from nmcli.cli.app import emit_json, guarded, progress_bar, show_progress, stderr

if TYPE_CHECKING:
    from nmcli.prune import PruneResult


@guarded
def command(
    model: str = typer.Argument(
        ..., help="Model source: file.safetensors|.pt|.pth|.pt2, hf:, torchvision:, timm:, py:module:factory."
    ),
    pattern: str = typer.Option(
        "2:4", "-p", "--pattern", help="N:M pattern (0 < N < M <= 32); only 2:4 is accelerated."
    ),
    method: str = typer.Option("magnitude", "--method", help="Pruning method."),
    include: list[str] = typer.Option([], "--include", help="Prune only modules matching this glob (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Leave modules matching this glob dense (repeatable)."),
    arch: str | None = typer.Option(
        None, "--arch", help="Architecture source for a plain state dict, or to override a checkpoint's source."
    ),
    trust: bool = typer.Option(False, "--trust", help="Allow unpickling a pickled nn.Module (runs the file's code)."),
    input_shape: str | None = typer.Option(
        None, "--input-shape", help="Input spec stored for later commands, e.g. 1x3x224x224."
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
    dimension is a multiple of M is pruned along its input dimension, keeping the N largest
    magnitudes of every M; every skipped layer is listed with its reason.
    """
    from nmcli.patterns import parse_pattern, pattern_note
    from nmcli.prune import run_prune

    with progress_bar("pruning", show_progress(json_output)) as update:
        result = run_prune(
            model,
            pattern=pattern,
            method=method,
            include=include,
            exclude=exclude,
            arch=arch,
            trust=trust,
            input_shape=input_shape,
            keep_dense=keep_dense,
            output=output,
            force=force,
            progress=update,
        )
    if json_output:
        emit_json(result.to_json())
        return
    _render(result)
    note = pattern_note(parse_pattern(pattern))
    if note:
        stderr.print(f"[yellow]note:[/yellow] {note}")


def _render(result: PruneResult) -> None:
    from rich.table import Table

    table = Table(title=f"prune {result.pattern} ({result.method})", title_justify="left")
    table.add_column("layer")
    table.add_column("shape")
    table.add_column("status")
    table.add_column("reason")
    table.add_column("kept |w| %", justify="right")
    for layer in result.layers:
        status = "[green]pruned[/green]" if layer.status == "pruned" else "[dim]skipped[/dim]"
        kept = f"{100 * layer.kept_magnitude:.1f}" if layer.kept_magnitude is not None else ""
        table.add_row(layer.param, "x".join(map(str, layer.shape)), status, layer.reason, kept)
    stderr.print(table)
    pruned = sum(1 for layer in result.layers if layer.status == "pruned")
    stderr.print(
        f"pruned {pruned} of {len(result.layers)} layers to {result.pattern}: {result.params_pruned:,} of "
        f"{result.params_total:,} parameters zeroed ({100 * result.sparsity:.1f}% sparsity) -> [bold]{result.output}[/bold]"
    )

"""``nmcli sad``: Sparse Architecture Divergence between two or more sparse models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from nmcli.cli.app import emit_json, guarded, progress_bar, show_progress, stderr
from nmcli.cli.options import JsonOption, ModelClassOption, TrustOption, number_option

if TYPE_CHECKING:
    from nmcli.algorithms.sad import SadResult
    from nmcli.pipelines.sad import SadReport

_MAX_ROWS = 40


InputsArgument = Annotated[
    list[str],
    typer.Argument(
        metavar="INPUT",
        help="Two or more nmcli checkpoints, training checkpoints (.pt/.pth/.pth.tar/.bin), safetensors state "
        "dicts or model sources (a training trajectory, in order).",
    ),
]
PatternOption = Annotated[
    str | None,
    typer.Option(
        "-p",
        "--pattern",
        help="N:M rule that derives masks for inputs that store none (default: the pattern their stored zeros "
        "already hold, else 2:4).",
    ),
]
SadArchOption = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="Architecture of bare state dicts: its prunable layers count (default: layers inferred from the tensors).",
    ),
]
KeyOption = Annotated[
    str | None,
    typer.Option(
        "--key",
        help="Entry of a training checkpoint that holds the weights to compare, e.g. ema or state_dict_ema.",
    ),
]
FailAboveOption = Annotated[
    float | None,
    number_option(
        "--fail-above",
        help="Exit 1 when a reported normalized SAD exceeds this (0..1), for CI.",
        minimum=0,
        maximum=1,
    ),
]
PlotOption = Annotated[
    str | None,
    typer.Option("--plot", help="Write a PNG: SAD per layer (two inputs) or over the sequence (several)."),
]
ForcePlotOption = Annotated[bool, typer.Option("--force", help="Overwrite an existing --plot file.")]


@guarded
def command(
    inputs: InputsArgument,
    pattern: PatternOption = None,
    arch: SadArchOption = None,
    model_class: ModelClassOption = "auto",
    key: KeyOption = None,
    trust: TrustOption = False,
    fail_above: FailAboveOption = None,
    plot: PlotOption = None,
    force: ForcePlotOption = False,
    json_output: JsonOption = False,
) -> None:
    """Count the connections whose kept/pruned state differs between sparse models (SAD).

    SAD sums, over the layers pruned in both, the XOR of the two bit-packed masks; it is reported
    as a count, the number of weights compared and their ratio, overall and per layer. Masks come
    from nmcli checkpoints; inputs that store none (training checkpoints, state dicts, models) get
    them from the N:M rule. Without --arch, a bare state dict's layers are inferred from its
    tensors: floating *.weight tensors of 2+ dimensions whose input dimension (dim 1) is > 1 and a
    multiple of M, except embeddings, norms and positional tables by name (embed, norm, bn, ln,
    pos). Several inputs: each consecutive pair, and each against the first.
    """
    from nmcli.commands.sad import plot_report, require_matplotlib, sad_report
    from nmcli.errors import CheckFailedError
    from nmcli.io import check_output_path
    from nmcli.nm.pattern import parse_pattern
    from nmcli.trust import remember_command_line

    remember_command_line([*inputs, arch], trust=trust)  # the user's own code: later rebuilds may run it

    parsed = parse_pattern(pattern) if pattern else None
    if plot:
        require_matplotlib()
        check_output_path(plot, force=force, inputs=inputs, option="--plot")
    with progress_bar("comparing masks", show_progress(json_output)) as update:
        report = sad_report(
            inputs, pattern=parsed, arch=arch, trust=trust, key=key, progress=update, model_class=model_class
        )
    if plot:
        plot_report(report, plot, force=force, inputs=inputs)
    if json_output:
        emit_json(report.to_json())
    else:
        _render_inferred(report)
        _render(report)
        if plot:
            stderr.print(f"plot -> [bold]{plot}[/bold]")
    from rich.markup import escape

    for note in report.notes:
        stderr.print(f"[yellow]note:[/yellow] {escape(note)}")
    if fail_above is not None:
        over = report.exceeding(fail_above)
        if over:
            worst = max(over, key=lambda r: r.normalized)
            raise CheckFailedError(
                f"normalized SAD {worst.normalized:.6g} of {worst.a} vs {worst.b} exceeds --fail-above {fail_above:g}"
                f"{f' ({len(over)} pairs above it)' if len(over) > 1 else ''}"
            )


def _pct(value: float) -> str:
    return f"{100 * value:.3f}"


def _render_pair(result: SadResult) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"SAD {escape(str(result.a))} vs {escape(str(result.b))}", title_justify="left")
    table.add_column("layer")
    table.add_column("SAD", justify="right")
    table.add_column("weights", justify="right")
    table.add_column("SAD %", justify="right")
    ranked = result.by_divergence()
    for layer in ranked[:_MAX_ROWS]:
        table.add_row(escape(layer.param), f"{layer.sad:,}", f"{layer.total:,}", _pct(layer.normalized))
    stderr.print(table)
    if len(ranked) > _MAX_ROWS:
        stderr.print(f"[dim]... {len(ranked) - _MAX_ROWS} less divergent layers not shown (--json lists all)[/dim]")
    _one_sided(result)
    stderr.print(
        f"SAD {result.sad:,} of {result.total:,} weights in {len(result.layers)} pruned layers "
        f"([bold]{_pct(result.normalized)}%[/bold], normalized {result.normalized:.6g})"
    )


def _one_sided(result: SadResult) -> None:
    from rich.markup import escape

    for layer in result.one_sided:
        which = result.a if layer.pruned_in == "a" else result.b
        other = result.b if layer.pruned_in == "a" else result.a
        stderr.print(
            f"[yellow]warning:[/yellow] {escape(layer.param)} is pruned in {escape(str(which))} but dense in "
            f"{escape(str(other))} ({layer.pruned:,} of {layer.total:,} weights pruned): not in the SAD sum"
        )


def _render(report: SadReport) -> None:
    from rich.markup import escape
    from rich.table import Table

    if len(report.inputs) == 2:
        _render_pair(report.pairs[0])
        return
    table = Table(title=f"SAD over {len(report.inputs)} inputs", title_justify="left")
    table.add_column("pair")
    table.add_column("a")
    table.add_column("b")
    table.add_column("SAD", justify="right")
    table.add_column("weights", justify="right")
    table.add_column("SAD %", justify="right")
    for kind, results in (("consecutive", report.pairs), ("vs first", report.vs_first)):
        for result in results:
            table.add_row(
                kind,
                escape(str(result.a)),
                escape(str(result.b)),
                f"{result.sad:,}",
                f"{result.total:,}",
                _pct(result.normalized),
            )
    stderr.print(table)
    for result in report.results:
        _one_sided(result)
    stderr.print("[dim]per-layer figures: --json[/dim]")


def _render_inferred(report: SadReport) -> None:
    """For inputs whose layers were inferred: every tensor taken or skipped, with the reason (once per layout)."""
    from rich.markup import escape
    from rich.table import Table

    shown: dict[tuple[tuple[str, bool], ...], str] = {}
    for entry in report.masks:
        if entry.get("layers_from") != "inferred":
            continue
        tensors = entry["tensors"]
        layout = tuple((t["param"], t["taken"]) for t in tensors)
        if layout in shown:
            stderr.print(f"[dim]{escape(entry['input'])}: the same layers, inferred the same way[/dim]")
            continue
        shown[layout] = entry["input"]
        pattern = report.pattern.pattern if report.pattern else None
        table = Table(
            title=f"layers of {escape(entry['input'])}: inferred from its tensors (no --arch), {pattern}",
            title_justify="left",
        )
        table.add_column("tensor")
        table.add_column("shape")
        table.add_column("layer")
        table.add_column("reason")
        minor = 0
        for t in tensors:
            if not t["taken"] and len(t["shape"]) < 2:
                minor += 1
                continue
            table.add_row(
                escape(t["param"]),
                "x".join(map(str, t["shape"])),
                "[green]taken[/green]" if t["taken"] else "[dim]skipped[/dim]",
                escape(t["reason"]),
            )
        stderr.print(table)
        taken = sum(1 for t in tensors if t["taken"])
        detail = f"; {escape(entry['checkpoint'])}" if entry.get("checkpoint") else ""
        stderr.print(
            f"{taken} of {len(tensors)} tensors taken as sparse layers (inferred); {minor} other tensors with "
            f"fewer than 2 dimensions skipped (--json lists every tensor){detail}"
        )

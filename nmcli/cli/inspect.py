"""``nmcli inspect``: N:M compliance of a checkpoint, any model source, or an ONNX file."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from nmcli.cli.app import emit_json, esc, guarded, stderr
from nmcli.cli.options import ArchOption, JsonOption, ModelClassOption, TrustOption

if TYPE_CHECKING:
    from nmcli.commands.inspect import InspectReport

_MAX_NAMED = 3


TargetArgument = Annotated[
    str,
    typer.Argument(
        help="An nmcli checkpoint, an .onnx file, or any model source: file.safetensors|.pt|.pth|.pt2, hf:, "
        "torchvision:, timm:, py:module:factory."
    ),
]
PatternOption = Annotated[
    str | None,
    typer.Option("-p", "--pattern", help="N:M pattern to check (default: the checkpoint's pattern, else 2:4)."),
]
StrictOption = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="Exit 1 when an eligible layer is not N:M-compliant (a sharded checkpoint's weights are checked "
        "against its masks), or when an nmcli file's content does not match its recorded sha256.",
    ),
]
MasksOnlyOption = Annotated[
    bool,
    typer.Option(
        "--masks-only",
        help="For a sharded checkpoint: measure its stored masks only, without reading the shards' weights "
        "(fast; the weights are not checked against the masks).",
    ),
]
RebuildOption = Annotated[
    bool,
    typer.Option(
        "--rebuild",
        help="For a checkpoint: rebuild the model from its source to list the layers a prune left dense too "
        "(default: read the file only).",
    ),
]


@guarded
def command(
    target: TargetArgument,
    pattern: PatternOption = None,
    arch: ArchOption = None,
    model_class: ModelClassOption = "auto",
    trust: TrustOption = False,
    strict: StrictOption = False,
    masks_only: MasksOnlyOption = False,
    rebuild: RebuildOption = False,
    json_output: JsonOption = False,
) -> None:
    """Check every layer of TARGET for N:M sparsity along its input dimension.

    Per layer: shape, sparsity, N:M compliance along the reduction axis, eligibility, and whether
    TensorRT's 2:4 sparse kernels could use it. An nmcli checkpoint's content is checked against
    the sha256 it records. With --strict, a non-compliant eligible layer or an edited checkpoint
    exits 1 (a CI gate).
    """
    from nmcli.commands.inspect import run_inspect
    from nmcli.errors import CheckFailedError
    from nmcli.nm.pattern import pattern_note
    from nmcli.trust import remember_command_line

    remember_command_line([target, arch], trust=trust)  # the user's own code: later rebuilds may run it
    report = run_inspect(
        target, pattern=pattern, arch=arch, trust=trust, rebuild=rebuild, masks_only=masks_only, model_class=model_class
    )
    if not report.eligible:
        report.notes.append(
            f"nothing to check: {target} has no layer eligible for {report.pattern} "
            "(--strict passes only because there is nothing to fail)"
        )
    if json_output:
        emit_json(report.to_json())
    else:
        _render(report)
        note = pattern_note(report.pattern)
        if note:
            stderr.print(f"[yellow]note:[/yellow] {note}")
    for remark in report.notes:
        stderr.print(f"[yellow]note:[/yellow] {esc(remark)}", markup=True)
    _render_integrity(report)
    failures = []
    if not report.compliant:
        bad = report.violations
        names = ", ".join(layer.param for layer in bad[:_MAX_NAMED]) + (" ..." if len(bad) > _MAX_NAMED else "")
        failures.append(
            f"{len(bad)} of {len(report.eligible)} eligible layer(s) of {target} are not {report.pattern}-compliant: "
            f"{names}"
        )
    if report.tampered:
        failures.append(f"{target}: {report.tampered}")
    if strict and failures:
        raise CheckFailedError("; ".join(failures))


def _render_integrity(report: InspectReport) -> None:
    """One stderr line on an nmcli checkpoint's content against its recorded sha256."""
    if report.integrity is None:
        return
    if report.tampered:
        stderr.print(f"[red]tampered:[/red] {esc(report.tampered)}", markup=True)
    elif report.integrity.absent:
        stderr.print(
            f"[yellow]note:[/yellow] {esc(', '.join(report.integrity.absent))} records no sha256 of its content "
            "(written before nmcli recorded one): its integrity cannot be checked",
            markup=True,
        )
    else:
        stderr.print("integrity: ok (the content matches its recorded sha256)")


def _render(report: InspectReport) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"inspect {report.pattern}: {escape(report.target)}", title_justify="left")
    table.add_column("layer")
    table.add_column("shape")
    table.add_column("axis", justify="right")
    table.add_column("sparsity %", justify="right")
    table.add_column(str(report.pattern))
    table.add_column("eligible")
    table.add_column("TRT 2:4")
    table.add_column("reason")
    for layer in report.layers:
        mark = "[green]yes[/green]" if layer.compliant else ("[red]no[/red]" if layer.eligible else "[dim]no[/dim]")
        eligible_mark = "yes" if layer.eligible else "[dim]no[/dim]"
        table.add_row(
            escape(layer.param),
            "x".join(map(str, layer.shape)),
            str(layer.axis),
            f"{100 * layer.sparsity:.1f}",
            mark,
            eligible_mark,
            "yes" if layer.tensorrt else f"[dim]no: {escape(layer.tensorrt_reason)}[/dim]",
            escape(layer.reason),
        )
    stderr.print(table)
    eligible = report.eligible
    bad = report.violations
    trt = sum(1 for layer in report.layers if layer.tensorrt)
    verdict = "[green]compliant[/green]" if not bad else f"[red]{len(bad)} not compliant[/red]"
    stderr.print(
        f"{len(eligible) - len(bad)} of {len(eligible)} eligible layers are {report.pattern} ({verdict}); "
        f"{len(report.layers)} layers listed, {trt} usable by TensorRT's 2:4 kernels"
    )

"""``nmcli sad``: the command logic behind the CLI, and the optional plot."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nmcli.errors import (
    BackendUnavailableError,
    InputError,
)
from nmcli.formats.open import classify, prefix_of
from nmcli.io import atomic_output
from nmcli.nm.pattern import Pattern
from nmcli.pipelines.sad import (
    MaskSet,
    SadReport,
    StoredMasks,
    WeightInput,
    check_pairs,
    choose_pattern,
    compare_sets,
    open_input,
    report_pairs,
    shape_mismatches,
)
from nmcli.progress import ProgressCallback

PLOT_HINT = "pip install 'nmcli[plot]'"


def sad_report(
    specs: Sequence[str],
    *,
    pattern: Pattern | None = None,
    arch: str | None = None,
    trust: bool = False,
    key: str | None = None,
    progress: ProgressCallback | None = None,
    model_class: str = "auto",
) -> SadReport:
    """SAD between two or more inputs (checkpoints, training checkpoints or model sources; see :func:`open_input`).

    Inputs with stored masks use them. The others get masks from the N:M rule, with ``pattern``
    or, without it, the pattern :func:`choose_pattern` picks for all of them together; their
    layers come from ``arch``, from the model itself, or are inferred from the tensors.
    ``model_class`` (``--model-class``) is the class of the ``hf:`` inputs and of an ``hf:`` ``arch``.

    Raises:
        InputError: fewer than two inputs; a ``model_class`` that no ``hf:`` input, ``hf:`` ``arch`` or
            checkpoint takes. SourceError/CheckpointError for inputs that cannot be read.
        MismatchError: inputs that differ in parameter names, shapes or layer patterns.
    """
    if len(specs) < 2:
        raise InputError("sad needs at least two inputs: nmcli sad A B [C ...]")
    takers = [s for s in specs if s.startswith("hf:") or classify(s).is_checkpoint]
    if model_class != "auto" and not takers and not (arch or "").startswith("hf:"):
        raise InputError(
            f"--model-class {model_class!r} picks the transformers class of an hf: source, and no input "
            "(nor --arch) is one: drop --model-class"
        )
    consecutive, vs_first = report_pairs(len(specs))
    unique = list(dict.fromkeys(consecutive + vs_first))
    with contextlib.ExitStack() as stack:
        opened: list[StoredMasks | WeightInput] = []
        for spec in specs:
            item = open_input(spec, arch=arch, trust=trust, key=key, model_class=model_class)
            stack.callback(item.close)
            opened.append(item)
        check_pairs(opened, unique, shape_mismatches)  # before any weight or mask is read
        choice = choose_pattern(opened, pattern)
        sets: list[MaskSet] = []
        described: list[dict[str, Any]] = []
        for item in opened:
            if isinstance(item, StoredMasks):
                sets.append(item)
                described.append({"input": item.label, "masks": "stored", "layers_from": "stored"})
            else:
                assert choice is not None
                sets.append(item.masks(choice.pattern))
                described.append(item.describe(choice.pattern))
        results = dict(zip(unique, compare_sets(sets, unique, progress), strict=True))
    return SadReport(list(specs), [results[p] for p in consecutive], [results[p] for p in vs_first], choice, described)


def require_matplotlib() -> None:
    """Check that matplotlib is importable.

    Raises:
        BackendUnavailableError: it is not installed (exit 3, with the pip command).
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(f"--plot needs matplotlib, which is not installed: {PLOT_HINT}") from exc


def _short(label: str) -> str:
    return label if prefix_of(label) else Path(label).name


def plot_report(
    report: SadReport,
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Draw SAD per layer (two inputs) or over the sequence (several) as a PNG, written atomically."""
    require_matplotlib()
    from matplotlib.figure import Figure

    if len(report.inputs) == 2:
        result = report.pairs[0]
        names = [x.param for x in result.layers]
        fig = Figure(figsize=(8, max(3.0, 0.28 * len(names) + 1.5)), layout="constrained")
        ax = fig.add_subplot()
        ax.barh(range(len(names)), [100 * x.normalized for x in result.layers], color="tab:red")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("SAD (% of the layer's weights)")
        ax.set_title(
            f"SAD {_short(report.inputs[0])} vs {_short(report.inputs[1])}: "
            f"{result.sad:,} of {result.total:,} ({100 * result.normalized:.2f}%)",
            fontsize=9,
        )
    else:
        steps = list(range(1, len(report.inputs)))
        fig = Figure(figsize=(8, 4.5), layout="constrained")
        ax = fig.add_subplot()
        ax.plot(steps, [100 * r.normalized for r in report.pairs], "o-", label="consecutive (previous vs this)")
        ax.plot(steps, [100 * r.normalized for r in report.vs_first], "s--", label="vs the first")
        ax.set_xticks(steps, [_short(s) for s in report.inputs[1:]], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("SAD (% of pruned weights)")
        ax.set_title(f"SAD over {len(report.inputs)} checkpoints (first: {_short(report.inputs[0])})", fontsize=9)
        ax.legend()
    ax.grid(alpha=0.3)
    with atomic_output(path, force=force, inputs=inputs, option="--plot") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)

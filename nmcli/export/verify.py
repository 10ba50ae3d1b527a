"""Verify an exported ONNX file: onnxruntime against the torch model, on random inputs.

The reference is always the float32 torch model rebuilt from the checkpoint, so an fp16/bf16
export is measured against what it approximates; default tolerances depend on the precision.
A run passes when every output element satisfies ``|onnx - torch| <= atol + rtol * |torch|``
(``numpy.allclose``); the report states that rule and gives the worst element by it (its
difference, the torch value and the difference allowed there), so a "passed" line can never
show a number that looks over a tolerance.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from nmcli.errors import InputError
from nmcli.export.onnx import TensorModel
from nmcli.inputs import InputSpec, example_inputs

# (atol, rtol) per precision: fp32 allows reordered float sums; fp16 has 11 significant bits,
# bf16 has 8; int8/fp8 quantize the float32 ONNX, whose own check is a float32 one.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (1e-4, 1e-3),
    "int8": (1e-4, 1e-3),
    "fp8": (1e-4, 1e-3),
    "fp16": (2e-2, 2e-2),
    "bf16": (1e-1, 5e-2),
}


def default_tolerances(precision: str) -> tuple[float, float]:
    """``(atol, rtol)`` for ``precision``.

    Raises:
        InputError: unknown precision.
    """
    try:
        return DEFAULT_TOLERANCES[precision]
    except KeyError:
        raise InputError(f"unknown precision {precision!r}: choose one of {', '.join(DEFAULT_TOLERANCES)}") from None


RULE = "|onnx - torch| <= atol + rtol * |torch| for every element"


@dataclass(frozen=True)
class VerifyRun:
    """One comparison: the input spec used and the differences found.

    ``worst_*`` describe the element that comes closest to breaking (or breaks most) the rule
    ``|onnx - torch| <= atol + rtol * |torch|``: its difference, the torch value's magnitude, and
    the difference the rule allows there. ``passed`` is ``worst_diff <= worst_allowed``.
    """

    spec: str
    max_abs_diff: float
    max_rel_diff: float
    passed: bool
    worst_diff: float = 0.0
    worst_reference: float = 0.0
    worst_allowed: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "input": self.spec,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "passed": self.passed,
            "worst_element": {
                "abs_diff": self.worst_diff,
                "abs_torch": self.worst_reference,
                "allowed": self.worst_allowed,
            },
        }

    def summary(self) -> str:
        relation = "<=" if self.passed else ">"
        return (
            f"{self.spec}: worst element |diff| {self.worst_diff:.3g} {relation} allowed {self.worst_allowed:.3g} "
            f"(|torch| {self.worst_reference:.3g}); max abs diff {self.max_abs_diff:.3g}"
        )


@dataclass
class VerifyResult:
    """All comparisons of one ONNX file.

    Attributes:
        runs: one per input spec tried.
        atol: absolute tolerance used.
        rtol: relative tolerance used.
        skipped: why verification could not run (onnxruntime lacks a kernel), else None.
    """

    runs: list[VerifyRun] = field(default_factory=list)
    atol: float = 0.0
    rtol: float = 0.0
    skipped: str | None = None

    @property
    def passed(self) -> bool | None:
        """True/False, or None when verification was skipped."""
        return None if self.skipped else all(r.passed for r in self.runs)

    @property
    def max_abs_diff(self) -> float | None:
        return max((r.max_abs_diff for r in self.runs), default=None)

    @property
    def max_rel_diff(self) -> float | None:
        return max((r.max_rel_diff for r in self.runs), default=None)

    def summary(self) -> str:
        """One line that states the rule and, per run, the worst element by it."""
        runs = "; ".join(r.summary() for r in self.runs)
        return f"rule {RULE} (atol {self.atol:g}, rtol {self.rtol:g}): {runs}"

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "rule": RULE,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "atol": self.atol,
            "rtol": self.rtol,
            "skipped": self.skipped,
            "runs": [r.to_json() for r in self.runs],
        }


def compare(
    reference: Sequence[np.ndarray], actual: Sequence[np.ndarray], atol: float, rtol: float
) -> tuple[float, float, bool]:
    """``(max_abs_diff, max_rel_diff, allclose)`` over matching outputs (see :func:`compare_outputs`)."""
    run = compare_outputs("", reference, actual, atol, rtol)
    return run.max_abs_diff, run.max_rel_diff, run.passed


def compare_outputs(
    spec: str, reference: Sequence[np.ndarray], actual: Sequence[np.ndarray], atol: float, rtol: float
) -> VerifyRun:
    """Compare matching outputs elementwise by ``|actual - reference| <= atol + rtol * |reference|``
    (``numpy.allclose``), finding the worst element by that rule.

    Raises:
        InputError: different numbers or shapes of outputs.
    """
    if len(reference) != len(actual):
        raise InputError(f"the ONNX model returns {len(actual)} outputs, torch returns {len(reference)}")
    max_abs = max_rel = 0.0
    worst = (-1.0, 0.0, 0.0, 0.0)  # (excess ratio, diff, |reference|, allowed)
    ok = True
    for ref, got in zip(reference, actual, strict=True):
        if ref.shape != got.shape:
            raise InputError(f"an ONNX output has shape {got.shape}, torch's has {ref.shape}")
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        diff = np.abs(ref64 - got64)
        ok = ok and bool(np.allclose(got64, ref64, atol=atol, rtol=rtol, equal_nan=False))
        if not diff.size:
            continue
        diff = np.where(np.isnan(diff), np.inf, diff)
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float((diff / np.maximum(np.abs(ref64), 1e-12)).max()))
        allowed = atol + rtol * np.abs(ref64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(allowed > 0, diff / allowed, np.where(diff > 0, np.inf, 0.0))
        index = int(np.argmax(ratio))
        if float(ratio.flat[index]) > worst[0]:
            worst = (
                float(ratio.flat[index]),
                float(diff.flat[index]),
                float(abs(ref64.flat[index])),
                float(allowed.flat[index]),
            )
    return VerifyRun(spec, max_abs, max_rel, ok, worst[1], worst[2], worst[3])


def verify_onnx(
    onnx_path: str | os.PathLike[str],
    model: nn.Module,
    specs: Sequence[InputSpec],
    *,
    atol: float,
    rtol: float,
    vocab_size: int | None = None,
    seed: int = 0,
) -> VerifyResult:
    """Run the ONNX file in onnxruntime (CPU) and the torch ``model`` on the same random inputs.

    Args:
        onnx_path: the exported file (positional graph inputs in spec order).
        model: the float32 torch model; it is wrapped like the export (tensor outputs, use_cache off).
        specs: input specs to try (e.g. the stored one, and a second batch size when dynamic).
        atol: absolute tolerance.
        rtol: relative tolerance.
        vocab_size: token-id range for integer inputs.
        seed: random seed of the inputs.
    """
    import onnxruntime as ort

    result = VerifyResult(atol=atol, rtol=rtol)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own NOT_IMPLEMENTED / INVALID_GRAPH errors
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text:
            result.skipped = f"onnxruntime's CPU provider cannot run this graph ({text})"
            return result
        raise InputError(
            f"onnxruntime cannot load {onnx_path} ({text}): the export is broken; rerun with --debug"
        ) from exc
    graph_inputs = [i.name for i in session.get_inputs()]
    reference_model = TensorModel(model, [t.name for t in specs[0].tensors] if specs[0].named else None, torch.float32)
    for spec in specs:
        args_, kwargs = example_inputs(spec, vocab_size=vocab_size or 1000, seed=seed)
        args = tuple(args_) + tuple(kwargs[t.name] for t in spec.tensors if t.name)
        with torch.no_grad():
            ref = [t.detach().float().numpy() for t in reference_model(*args)]
        feeds = {name: value.numpy() for name, value in zip(graph_inputs, args, strict=True)}
        got = session.run(None, feeds)
        result.runs.append(compare_outputs(str(spec), ref, [np.asarray(g, dtype=np.float32) for g in got], atol, rtol))
    return result

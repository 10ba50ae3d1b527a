"""Explicitly quantized (Q/DQ) ONNX for TensorRT: 2:4 sparse weights in INT8 or FP8 (E4M3).

The float32 ONNX of the sparse model is quantized by onnxruntime's QDQ quantizer
(``onnxruntime.quantization.quantize_static`` with ``QuantFormat.QDQ``), calibrated on the user's
``--calib`` data. onnxruntime's calibrator for the ``--calib-method`` runs on the tensors that get
Q/DQ only (:func:`calibrate_ranges`) and hands its ranges to ``quantize_static`` through its
calibration cache. The settings follow TensorRT's
explicit-quantization rules (TensorRT "Explicit Quantization" and "Working with Quantized Types"):

* **symmetric** everything (zero points 0): weights per output channel (``per_channel=True``,
  ``WeightSymmetric``; INT8 weights in ``[-127, 127]``), activations per tensor
  (``ActivationSymmetric``; INT8 in ``[-128, 127]``), no ``reduce_range``. A pruned weight's zero
  quantizes to exactly zero, so the int8 initializer keeps the N:M pattern; this is checked
  (:func:`check_quantized_layers`) and a file where it does not hold is never written.
* weights stay **int8 initializers behind DequantizeLinear** (what TensorRT wants for pre-quantized
  weights); biases stay float (``QuantizeBias=False``: TensorRT takes no int32 bias Q/DQ).
* **inputs of every weighted Conv/Gemm/MatMul** are quantized. That input quantizer is also the
  *output* quantizer of the GEMM before it: TensorRT fuses the pointwise ops between them (bias,
  ReLU, GELU) and the Q into the producer's epilogue, so consecutive GEMMs run INT8-in/INT8-out
  and the sparse INT8 kernels are eligible. Where a GEMM's output meets a **residual Add** whose sum
  feeds the next GEMM (a conv-net's skip connection), that Add is quantized too, so TensorRT can fuse the
  Add into the conv (the ResNet case of TensorRT's Q/DQ placement guide and ModelOpt's
  ``qdq_graph`` residual rule). Activation-by-activation MatMuls (attention scores), bias Adds and
  attention-mask Adds are left float: quantizing them costs accuracy and gives no sparse kernel.
* **no Q/DQ on a GEMM's own output** (``OpTypesToExcludeOutputQuantization``), as onnxruntime's
  quantizer itself recommends for TensorRT: the output quantizer is the next GEMM's input
  quantizer, after the bias and activation that TensorRT fuses into the epilogue. A Q on the raw
  output (what ``quantize_static`` places by default) is where TensorRT cannot fuse it, and on
  MiniLM it cost most of the accuracy (embedding cosine 0.726 with it, 0.867 without).
* INT8 only: **SmoothQuant-style scaling** of MatMul/Gemm inputs with outlier channels
  (:mod:`nmcli.export.smooth`), per input where the simulated INT8 error says it helps (MiniLM:
  0.867 -> 0.887 against a float sparse 0.889).

FP8 is E4M3 per tensor (``QFLOAT8E4M3FN``; onnxruntime calibrates float8 with its
``Distribution`` method); onnxruntime's CPU provider runs few FP8 kernels, so its numerical check
may be skipped, with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nmcli.errors import BackendUnavailableError, CheckFailedError, InputError
from nmcli.export.smooth import Smoothing, smooth_model
from nmcli.formats.onnx_layout import (
    QUANTIZATION_KEY,
    WeightMatch,
    find_weights,
    initializer_tensor,
    set_metadata_prop,
    set_sparse_layers,
    weight_compliance,
)
from nmcli.io import atomic_output
from nmcli.nm.pattern import Pattern

QUANT_PRECISIONS = ("int8", "fp8")
CALIB_METHODS = ("max", "percentile", "entropy")
DEFAULT_CALIB_METHOD = "max"
_WEIGHTED = ("Conv", "Gemm", "MatMul")
_QUANTIZED_TYPES = {3: "int8", 17: "float8e4m3fn"}  # TensorProto INT8, FLOAT8E4M3FN


def check_quant_options(precision: str, calib: str | None, method: str) -> None:
    """``--calib`` and ``--calib-method`` fit ``--precision``, before anything is read or written.

    Raises:
        InputError: int8/fp8 without ``--calib``, ``--calib`` with a float precision, or an unknown method.
    """
    if precision in QUANT_PRECISIONS and calib is None:
        raise InputError(
            f"--precision {precision} needs calibration data: pass --calib SPEC (any data --calib of nmcli prune "
            "takes, e.g. tensors:calib.safetensors or text:sentences.txt)"
        )
    if precision not in QUANT_PRECISIONS and calib is not None:
        raise InputError(f"--calib is for --precision int8 or fp8, not {precision}: drop --calib")
    if method not in CALIB_METHODS:
        raise InputError(f"--calib-method {method!r} is unknown: use {', '.join(CALIB_METHODS)}")


@dataclass(frozen=True)
class QuantizedLayer:
    """A pruned layer's weight in the Q/DQ graph.

    Attributes:
        param: the torch parameter.
        initializer: the quantized initializer behind DequantizeLinear ("" when the weight stayed float).
        node: its Conv/Gemm/MatMul node.
        axis: the N:M reduction axis in the initializer's layout.
        dtype: ``int8``, ``float8e4m3fn`` or ``float`` (not quantized).
        compliant: whether the quantized values are N:M along ``axis``.
    """

    param: str
    initializer: str
    node: str
    axis: int
    dtype: str
    compliant: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "param": self.param,
            "initializer": self.initializer,
            "node": self.node,
            "axis": self.axis,
            "dtype": self.dtype,
            "compliant": self.compliant,
        }


@dataclass
class QuantCheck:
    """The Q/DQ model against the float sparse model on held-out calibration inputs (onnxruntime).

    Attributes:
        examples: held-out examples compared.
        cosine: mean cosine similarity of the flattened outputs, per example (first output).
        min_cosine: the lowest per-example cosine.
        top1: fraction of examples whose arg-max class agrees (2-D outputs with several classes), else None.
        skipped: why no numerical check ran ("" when it ran).
    """

    examples: int = 0
    cosine: float | None = None
    min_cosine: float | None = None
    top1: float | None = None
    skipped: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "cosine": self.cosine,
            "min_cosine": self.min_cosine,
            "top1_agreement": self.top1,
            "skipped": self.skipped or None,
        }

    def summary(self) -> str:
        if self.skipped:
            return f"numerical check skipped: {self.skipped}"
        text = f"cosine {self.cosine:.4f} (min {self.min_cosine:.4f}) on {self.examples} held-out example(s)"
        return text + (f", top-1 agreement {100 * self.top1:.1f}%" if self.top1 is not None else "")


@dataclass
class QuantizedOnnx:
    """A written Q/DQ ONNX file and what was checked.

    Attributes:
        path: the ``.onnx`` file.
        precision: ``int8`` or ``fp8``.
        method: the calibration method.
        calibration_examples: examples the activation ranges were calibrated on.
        layers: the pruned layers' quantized weights.
        quantized_nodes: the Conv/Gemm/MatMul/Add nodes given Q/DQ inputs.
        check: the comparison with the float sparse model.
        notes: what the user should know.
        smoothing: the GEMM inputs considered for SmoothQuant-style scaling (int8) and what was chosen.
    """

    path: Path
    precision: str
    method: str
    calibration_examples: int
    layers: list[QuantizedLayer] = field(default_factory=list)
    quantized_nodes: list[str] = field(default_factory=list)
    check: QuantCheck = field(default_factory=QuantCheck)
    notes: list[str] = field(default_factory=list)
    smoothing: list[Smoothing] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "precision": self.precision,
            "calib_method": self.method,
            "calibration_examples": self.calibration_examples,
            "quantized_nodes": len(self.quantized_nodes),
            "sparse_layers": [layer.to_json() for layer in self.layers],
            "agreement": self.check.to_json(),
            "smoothing": [item.to_json() for item in self.smoothing],
            "smoothed_inputs": sum(item.alpha is not None for item in self.smoothing),
        }


def _constant_names(graph: Any) -> set[str]:
    names = {i.name for i in graph.initializer}
    names.update(o for n in graph.node if n.op_type == "Constant" for o in n.output)
    return names


def quantization_plan(model: Any) -> tuple[list[str], list[str]]:
    """``(quantize, exclude)``: node names of the Conv/Gemm/MatMul/Add nodes that get Q/DQ inputs, and the rest.

    Quantized: every Conv/Gemm/MatMul with a weight initializer, and every Add joining a weighted
    op's output (directly or through its bias Add) with another activation (a residual join) whose
    sum feeds a weighted op (directly or through a ReLU). A transformer's residual Add feeds a
    LayerNorm, which takes no INT8: quantizing it would cost accuracy (the residual stream's outliers)
    for no INT8 kernel, so it stays float.
    """
    graph = model.graph
    weighted = {w.node for w in find_weights(model)}
    constants = _constant_names(graph)
    producers = {out: node for node in graph.node for out in node.output}

    def from_weighted(name: str) -> bool:
        node = producers.get(name)
        if node is not None and node.op_type == "Add" and any(i in constants for i in node.input):
            node = producers.get(next(i for i in node.input if i not in constants))
        return node is not None and node.name in weighted

    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def feeds_weighted(node: Any) -> bool:  # directly or through one ReLU (the conv-net skip connection)
        nexts = [c for out in node.output for c in consumers.get(out, [])]
        nexts += [c for n in nexts if n.op_type == "Relu" for out in n.output for c in consumers.get(out, [])]
        return any(c.name in weighted for c in nexts)

    quantize: list[str] = []
    exclude: list[str] = []
    for node in graph.node:
        if node.op_type in _WEIGHTED:
            (quantize if node.name in weighted else exclude).append(node.name)
        elif node.op_type == "Add":
            residual = not any(i in constants for i in node.input) and any(from_weighted(i) for i in node.input)
            (quantize if residual and feeds_weighted(node) else exclude).append(node.name)
    return quantize, exclude


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime.quantization warns through the root logger and its calibrators print to stdout:
    neither may reach nmcli's stdout (``--json``) or clutter stderr."""
    import io
    import logging
    from contextlib import redirect_stdout

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


@contextmanager
def _calibrator_errors(method: str) -> Iterator[None]:
    """A calibrator that fails on the data (onnxruntime's histograms refuse infinite values; only the
    tensors that get Q/DQ are calibrated, so an attention mask's ``finfo.min`` path no longer reaches
    them, but a quantized input that overflows still would) is exit 2 with the method to use instead."""
    try:
        yield
    except ValueError as exc:
        if method == "max":
            raise
        raise InputError(
            f"onnxruntime's {method} calibrator failed on this model ({str(exc).strip()[:160]}): use --calib-method max"
        ) from exc


# (calibrator class, its options) per method. onnxruntime's Entropy default (128 bins, 128 quantized
# bins) cannot clip anything and measured the same ranges as max; nmcli uses TensorRT's entropy
# calibrator setting (2048 bins, 128 quantized bins), so ``entropy`` is a real KL-divergence choice.
_CALIBRATORS: dict[str, tuple[str, dict[str, Any]]] = {
    "max": ("MinMaxCalibrater", {"symmetric": True}),
    "percentile": ("PercentileCalibrater", {"symmetric": True, "num_bins": 2048, "percentile": 99.999}),
    "entropy": ("EntropyCalibrater", {"symmetric": True, "num_bins": 2048, "num_quantized_bins": 128}),
    # float8: onnxruntime's Distribution, the only method quantize_static takes for it
    "fp8": ("DistributionCalibrater", {"num_bins": 2048, "scenario": "same"}),
}


def _calibration_method(method: str, precision: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    if precision == "fp8":
        return CalibrationMethod.Distribution
    return {
        "max": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]


def quantized_inputs(model: Any, nodes: Sequence[str]) -> set[str]:
    """The activation tensors that get Q/DQ: every non-constant input of the ``nodes`` to quantize.

    Outputs of weighted ops get none (``OpTypesToExcludeOutputQuantization``): a Q on a GEMM's raw
    output, before its bias, GELU or residual Add, is where TensorRT cannot fuse it, and on MiniLM it
    quantized the FFN output (the residual stream's outlier channels, |x| up to ~200) to steps of 1.5.
    """
    constants = _constant_names(model.graph)
    wanted = set(nodes)
    return {i for n in model.graph.node if n.name in wanted for i in n.input if i and i not in constants}


def calibrate_ranges(
    model_path: Path, tensors: set[str], feeds: Sequence[Mapping[str, np.ndarray]], *, method: str, precision: str
) -> Any:
    """onnxruntime's calibrator for ``method``, run on ``feeds`` over ``tensors`` only; its ``TensorsData``.

    ``quantize_static`` calibrates every input and output of every node of the op types it quantizes,
    which for a BERT-like model includes the attention-mask Add (``finfo.min``): its histogram
    calibrators then fail ("range [0.0, inf] is not finite"). Narrowing the calibrator's
    ``select_tensors_to_calibrate`` to the tensors that get Q/DQ keeps onnxruntime's calibration
    code and fixes that (and calibrates ~7x fewer tensors on MiniLM).
    """
    import tempfile

    from onnxruntime.quantization import calibrate

    name, options = _CALIBRATORS["fp8" if precision == "fp8" else method]
    base = getattr(calibrate, name)

    class _QuantizedTensorsOnly(base):  # type: ignore[misc,valid-type]
        def select_tensors_to_calibrate(self, model: Any) -> tuple[set[str], dict[str, Any]]:
            found, value_infos = super().select_tensors_to_calibrate(model)
            return found & tensors, value_infos

    with tempfile.TemporaryDirectory(prefix=".nmcli-calib-", dir=model_path.parent) as stage:
        calibrator = _QuantizedTensorsOnly(model_path, None, str(Path(stage) / "augmented.onnx"), **options)
        calibrator.augment_graph()
        calibrator.create_inference_session()
        calibrator.collect_data(_reader(feeds))
        return calibrator.compute_data()


def _reader(feeds: Sequence[Mapping[str, np.ndarray]]) -> Any:
    """An onnxruntime ``CalibrationDataReader`` over ``feeds`` (one graph-input dict per run)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return dict(item) if (item := next(self.items, None)) is not None else None

    return _Feeds()


def quantize_onnx(
    float_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    calibration: Sequence[Mapping[str, np.ndarray]],
    held_out: Sequence[Mapping[str, np.ndarray]],
    *,
    precision: str,
    method: str = DEFAULT_CALIB_METHOD,
    pruned: Sequence[WeightMatch] = (),
    patterns: Mapping[str, Pattern] | None = None,
    force: bool = False,
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> QuantizedOnnx:
    """Quantize the float32 ONNX at ``float_path`` to a Q/DQ ONNX at ``out`` (see the module docstring).

    Args:
        float_path: the float32 export of the sparse model (metadata of ``nmcli export``).
        out: the Q/DQ ``.onnx`` output, written atomically after every check passed.
        calibration: graph-input dicts the activation ranges are calibrated on.
        held_out: graph-input dicts the Q/DQ model is compared with the float one on.
        precision: ``int8`` or ``fp8``.
        method: ``max``, ``percentile`` or ``entropy`` (fp8 always uses onnxruntime's Distribution).
        pruned: where the pruned layers sit in the float graph.
        patterns: torch parameter -> its N:M pattern.
        force: overwrite an existing output.
        inputs: input files that must not be overwritten.

    For int8 the float graph is first smoothed (:func:`nmcli.export.smooth.smooth_model`); the
    agreement check compares against the unsmoothed float file.

    Raises:
        InputError: a precision or method nmcli does not quantize to.
        BackendUnavailableError: an onnxruntime whose ``quantize_static`` takes no calibration cache.
        CheckFailedError: a pruned layer's quantized weight is not N:M (nothing is written).
    """
    import inspect
    import tempfile

    import onnx
    from onnxruntime.quantization import quantize_static, save_tensors_data

    if precision not in QUANT_PRECISIONS or method not in CALIB_METHODS:
        raise InputError(f"cannot quantize to {precision} with --calib-method {method}")
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise BackendUnavailableError(
            "--precision int8/fp8 needs an onnxruntime whose quantize_static takes calibration_cache_path "
            "(nmcli calibrates only the tensors that get Q/DQ and hands the ranges over): pip install -U onnxruntime"
        )
    source = onnx.load(str(float_path))
    quantize, exclude = quantization_plan(source)
    out_path = Path(out)
    with tempfile.TemporaryDirectory(prefix=".nmcli-qdq-", dir=out_path.parent) as stage:
        prepared, staged, ranges = Path(stage) / "float.onnx", Path(stage) / "qdq.onnx", Path(stage) / "ranges.json"
        model = onnx.ModelProto()
        model.CopyFrom(source)
        smoothing = smooth_model(model, quantize, calibration) if precision == "int8" else []
        onnx.save_model(model, str(prepared))
        with _quiet_quantizer(), _calibrator_errors(method):
            tensors = quantized_inputs(model, quantize)
            save_tensors_data(
                calibrate_ranges(prepared, tensors, calibration, method=method, precision=precision), ranges
            )
            _run_quantizer(prepared, staged, ranges, exclude, precision=precision, method=method)
        model = onnx.load(str(staged))
        layers = check_quantized_layers(model, pruned, patterns or {})
        _carry_metadata(source, model, layers, pruned, patterns or {}, precision, method)
        result = QuantizedOnnx(out_path, precision, method, len(calibration), layers, quantize, smoothing=smoothing)
        result.notes += _smoothing_notes(smoothing)
        result.check = compare_outputs(
            str(float_path), model.SerializeToString(), held_out, basic_optimizations=precision == "fp8"
        )
        if precision == "fp8":
            result.notes.append(
                "the fp8 model was checked with onnxruntime's basic graph optimizations: its extended Q/DQ "
                "fusions mis-handle float8 (a Relu between DequantizeLinear and QuantizeLinear is dropped)"
            )
        with atomic_output(out_path, force=force, inputs=inputs) as tmp:
            onnx.save_model(model, str(tmp))
    return result


def _run_quantizer(
    prepared: Path, staged: Path, ranges: Path, exclude: Sequence[str], *, precision: str, method: str
) -> None:
    """onnxruntime's ``quantize_static`` on ``prepared`` with the calibrated ``ranges`` (its cache file)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    qtype = QuantType.QInt8 if precision == "int8" else QuantType.QFLOAT8E4M3FN
    extra = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "AddQDQPairToWeight": False,
        "DedicatedQDQPair": False,
        "OpTypesToExcludeOutputQuantization": [*_WEIGHTED, "Add"],  # inputs only: see quantized_inputs
    }
    quantize_static(
        str(prepared),
        str(staged),
        None,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=[*_WEIGHTED, "Add"],
        nodes_to_exclude=list(exclude),
        per_channel=precision == "int8",
        reduce_range=False,
        activation_type=qtype,
        weight_type=qtype,
        calibrate_method=_calibration_method(method, precision),
        extra_options=extra,
        calibration_cache_path=str(ranges),
    )


def _smoothing_notes(smoothing: Sequence[Smoothing]) -> list[str]:
    done = [item for item in smoothing if item.alpha is not None]
    if not done:
        return []
    alphas = sorted({item.alpha for item in done if item.alpha is not None})
    return [
        f"{len(done)} of {len(smoothing)} GEMM input(s) were smoothed before quantization (SmoothQuant-style, alpha "
        f"{', '.join(f'{a:g}' for a in alphas)}, chosen per input by the simulated int8 error on the calibration "
        "data): a per-channel Mul before their quantizer, the weights' input rows scaled (zeros stay zero)"
    ]


def check_quantized_layers(
    model: Any, pruned: Sequence[WeightMatch], patterns: Mapping[str, Pattern]
) -> list[QuantizedLayer]:
    """Each pruned layer's weight in the Q/DQ graph (found by its consumer node), checked for N:M.

    Raises:
        CheckFailedError: a pruned layer's quantized weight breaks its N:M pattern (nothing is written).
    """
    by_node = {w.node: w for w in find_weights(model)}
    types = {i.name: i.data_type for i in model.graph.initializer}
    layers: list[QuantizedLayer] = []
    for match in pruned:
        if match.lost:
            continue
        weight = by_node.get(match.node)
        pattern = patterns[match.param.split("[", 1)[0]]
        if weight is None:
            layers.append(QuantizedLayer(match.param, "", match.node, match.axis, "float", False))
            continue
        dtype = _QUANTIZED_TYPES.get(types[weight.name], "float")
        _, compliant = weight_compliance(initializer_tensor(model, weight.name), pattern, weight.axis)
        layers.append(QuantizedLayer(match.param, weight.name, match.node, weight.axis, dtype, compliant))
    bad = [layer for layer in layers if not layer.compliant and layer.initializer]
    if bad:
        names = ", ".join(layer.param for layer in bad[:5])
        raise CheckFailedError(
            f"{len(bad)} pruned layer(s) are not N:M after quantization ({names}): the quantizer is not "
            "symmetric; nothing was written"
        )
    return layers


def _carry_metadata(
    source: Any,
    model: Any,
    layers: Sequence[QuantizedLayer],
    pruned: Sequence[WeightMatch],
    patterns: Mapping[str, Pattern],
    precision: str,
    method: str,
) -> None:
    """The float export's metadata on the Q/DQ model, its sparse-layer record naming the quantized initializers."""
    import json

    for prop in source.metadata_props:
        set_metadata_prop(model, prop.key, prop.value)
    by_param = {layer.param: layer for layer in layers if layer.initializer}
    moved = [
        WeightMatch(m.param, by_param[m.param].initializer, m.op_type, m.node, by_param[m.param].axis, m.how, True, "")
        for m in pruned
        if m.param in by_param
    ]
    if moved:
        set_sparse_layers(model, moved, patterns)
    set_metadata_prop(model, QUANTIZATION_KEY, json.dumps({"precision": precision, "calib_method": method}))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denominator = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    return float(a64 @ b64 / denominator) if denominator else float(np.array_equal(a64, b64))


def _session(model: str | bytes, *, basic: bool = False) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if basic:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def compare_outputs(
    float_model: str | bytes,
    qdq_model: str | bytes,
    held_out: Iterable[Mapping[str, np.ndarray]],
    *,
    basic_optimizations: bool = False,
) -> QuantCheck:
    """Run both models in onnxruntime (CPU) on ``held_out`` and compare their first outputs.

    ``basic_optimizations`` runs the Q/DQ model without onnxruntime's extended graph fusions: for
    float8 they are wrong (onnxruntime 1.2x-1.32 drops a Relu between DequantizeLinear and
    QuantizeLinear as if the zero point were the range's minimum, which it is only for unsigned
    integers), so an FP8 model is checked with the Q/DQ nodes run as written.

    A Q/DQ model onnxruntime cannot run here (FP8 kernels the CPU provider lacks) gives a check
    with ``skipped`` saying why, not an error: the graph itself was checked already.
    """
    feeds = list(held_out)
    if not feeds:
        return QuantCheck(skipped="no held-out calibration examples (give more --calib-samples)")
    reference = _session(float_model)
    expected = [reference.run(None, dict(f))[0] for f in feeds]
    try:
        quantized = _session(qdq_model, basic=basic_optimizations)
        runs = [(ref, quantized.run(None, dict(f))[0]) for ref, f in zip(expected, feeds, strict=True)]
    except Exception as exc:  # noqa: BLE001 - onnxruntime without the kernels for this precision
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return QuantCheck(skipped=f"onnxruntime cannot run this Q/DQ model on this CPU ({first[:200]})")
    cosines: list[float] = []
    agree = total = 0
    for ref, got in runs:
        rows_ref = ref.reshape(ref.shape[0], -1) if ref.ndim > 1 else ref.reshape(1, -1)
        rows_got = got.reshape(rows_ref.shape)
        cosines += [_cosine(r, g) for r, g in zip(rows_ref, rows_got, strict=True)]
        if ref.ndim == 2 and ref.shape[1] > 1:
            agree += int((ref.argmax(1) == got.argmax(1)).sum())
            total += ref.shape[0]
    return QuantCheck(
        examples=len(cosines),
        cosine=float(np.mean(cosines)),
        min_cosine=float(np.min(cosines)),
        top1=agree / total if total else None,
    )

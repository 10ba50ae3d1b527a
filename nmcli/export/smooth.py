"""SmoothQuant-style scale migration before the INT8 Q/DQ export (per GEMM input, chosen by measurement).

TensorRT takes one scale per activation tensor (per-tensor INT8). Transformer activations have a
few channels far larger than the rest (MiniLM's LayerNorm outputs and FFN GELU outputs: one channel
of the 1536 reaches 25 on the [CLS] token while the median channel stays under 2), so one per-tensor
scale leaves the ordinary channels a handful of INT8 steps. SmoothQuant (Xiao et al. 2023) divides
each input channel ``j`` of a GEMM's activation by ``s_j`` and multiplies row ``j`` of the weight by
``s_j``: ``(X / s) (s W) = X W`` exactly in float, and the quantization difficulty moves from the
activation to the weight, which is quantized per output channel. With
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``.

How nmcli applies it:

* ``1/s`` is an explicit ``Mul`` by a constant vector before the activation's Q/DQ. It cannot be
  folded into the op before it in the encoders this is for (a post-LayerNorm output also feeds
  the residual; a GELU is not linear); TensorRT fuses the pointwise Mul with the quantizer after it.
* The weight's rows along its N:M reduction axis are scaled: a zero stays zero, so the int8
  weight keeps its N:M pattern (the export checks it after quantization, as always).
* ``alpha`` is chosen **per activation tensor** on the calibration data, by the relative error of
  the GEMM outputs with INT8 simulated (per-tensor symmetric activation, per-channel symmetric
  weight, as the quantizer writes them); "no smoothing" is one of the candidates, so a tensor
  is only changed where the measurement says it helps.

onnxruntime's own SmoothQuant (``extra_options={"SmoothQuant": True}``) needs Intel Neural
Compressor, which nmcli does not depend on, and takes one global alpha; its per-channel MinMax
calibrator reduces over every axis but 1, which is the sequence axis of a transformer's
``[batch, sequence, hidden]`` activations, so the per-channel maxima are measured here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nmcli.formats.onnx_layout import find_weights

ALPHAS: tuple[float | None, ...] = (None, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # None: leave the tensor as it is
MAX_ROWS = 1024  # activation rows (tokens) per tensor the error is measured on


@dataclass(frozen=True)
class Smoothing:
    """One activation tensor considered for smoothing and what was measured.

    Attributes:
        tensor: the activation tensor (the GEMMs' shared input).
        nodes: the MatMul/Gemm nodes that take it.
        alpha: the migration strength chosen, or None when smoothing did not lower the error.
        error: the simulated INT8 relative output error without smoothing.
        smoothed_error: the same with the chosen alpha (equal to ``error`` when ``alpha`` is None).
    """

    tensor: str
    nodes: tuple[str, ...]
    alpha: float | None
    error: float
    smoothed_error: float

    def to_json(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "nodes": list(self.nodes),
            "alpha": self.alpha,
            "int8_error": self.error,
            "smoothed_int8_error": self.smoothed_error,
        }


@dataclass(frozen=True)
class _Consumer:
    node: str
    weight: str
    axis: int  # the weight's input-channel (reduction) axis in its initializer layout


def smoothing_groups(model: Any, nodes: Sequence[str]) -> dict[str, list[_Consumer]]:
    """Activation tensor -> the MatMul/Gemm nodes among ``nodes`` that take it with a float 2-D weight.

    Only GEMMs whose activation's last axis is the reduction axis qualify (MatMul with the weight
    second, Gemm without transA), and only weights no other node reads (scaling them must not
    change another layer). A tensor is left out when any of its GEMMs does not qualify.
    """
    graph = model.graph
    by_node = {n.name: n for n in graph.node}
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    wanted = set(nodes)
    groups: dict[str, list[_Consumer]] = {}
    bad: set[str] = set()
    for match in find_weights(model):
        node = by_node.get(match.node)
        if node is None or node.name not in wanted or node.op_type not in ("MatMul", "Gemm"):
            continue
        init = inits.get(match.name)
        transposed_a = any(a.name == "transA" and a.i for a in node.attribute)
        ok = (
            init is not None
            and init.data_type == 1  # FLOAT
            and len(init.dims) == 2
            and not match.through
            and readers.get(match.name) == 1
            and len(node.input) >= 2
            and node.input[1] == match.name
            and node.input[0] not in inits
            and not transposed_a
        )
        if ok:
            groups.setdefault(node.input[0], []).append(_Consumer(node.name, match.name, match.axis))
        elif node.input:
            bad.add(node.input[0])
    return {tensor: consumers for tensor, consumers in groups.items() if tensor not in bad}


def _channel_stats(
    model: Any, tensors: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]], max_rows: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-channel absolute maxima (last axis) of ``tensors`` over all ``feeds`` and a fixed sample of their rows."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in outputs:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    per_feed = max(1, math.ceil(max_rows / max(1, len(feeds))))
    amax: dict[str, np.ndarray] = {}
    rows: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
    for feed in feeds:
        for name, value in zip(tensors, session.run(list(tensors), dict(feed)), strict=True):
            flat = np.asarray(value, np.float32).reshape(-1, value.shape[-1])
            peak = np.abs(flat).max(0)
            amax[name] = np.maximum(amax[name], peak) if name in amax else peak
            rows[name].append(flat[rng.choice(flat.shape[0], min(per_feed, flat.shape[0]), replace=False)])
    return amax, {name: np.concatenate(parts)[:max_rows] for name, parts in rows.items()}


def _int8_error(x: np.ndarray, x_peak: float, weights: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> float:
    """Summed relative squared error of ``x @ w`` with x per-tensor and w per-column symmetric INT8."""
    step = max(x_peak, 1e-12) / 127.5
    xq = np.clip(np.round(x / step), -128, 127) * step
    error = 0.0
    for w, ref in zip(weights, refs, strict=True):
        w_step = np.abs(w).max(0, keepdims=True) / 127
        w_step[w_step == 0] = 1
        wq = np.round(w / w_step) * w_step
        error += float(((xq @ wq - ref) ** 2).sum() / max(float((ref**2).sum()), 1e-30))
    return error


def _scales(peak: np.ndarray, weight_peak: np.ndarray, alpha: float) -> np.ndarray:
    s = np.power(np.maximum(peak, 1e-5), alpha) / np.power(np.maximum(weight_peak, 1e-5), 1 - alpha)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)


def smooth_model(
    model: Any,
    nodes: Sequence[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    alphas: Sequence[float | None] = ALPHAS,
    max_rows: int = MAX_ROWS,
) -> list[Smoothing]:
    """Smooth the inputs of the MatMul/Gemm ``nodes`` of the float ONNX ``model`` in place (module docstring).

    Args:
        model: the float32 ``onnx.ModelProto``; changed in place (Mul nodes inserted, weights scaled).
        nodes: the node names that will get Q/DQ inputs.
        feeds: calibration graph inputs (the same the activation ranges are calibrated on).
        alphas: candidate strengths; None is "no smoothing".
        max_rows: activation rows sampled per tensor for the error measurement.

    Returns:
        One record per activation tensor considered, in graph order.
    """
    from onnx import helper, numpy_helper

    groups = smoothing_groups(model, nodes)
    if not groups or not feeds:
        return []
    tensors = list(groups)
    peaks, samples = _channel_stats(model, tensors, feeds, max_rows)
    inits = {i.name: i for i in model.graph.initializer}
    records: list[Smoothing] = []
    for tensor in tensors:
        consumers = groups[tensor]
        # every weight as [in, out]: the input-channel axis first
        weights = [np.moveaxis(numpy_helper.to_array(inits[c.weight]), c.axis, 0) for c in consumers]
        x = samples[tensor]
        refs = [x @ w for w in weights]
        weight_peak = np.max([np.abs(w).max(1) for w in weights], axis=0)
        errors = []
        for alpha in alphas:
            s = np.ones_like(peaks[tensor]) if alpha is None else _scales(peaks[tensor], weight_peak, alpha)
            errors.append(_int8_error(x / s, float((peaks[tensor] / s).max()), [w * s[:, None] for w in weights], refs))
        best = int(np.argmin(errors))
        alpha = alphas[best]
        plain = errors[alphas.index(None)] if None in alphas else float("nan")
        records.append(Smoothing(tensor, tuple(c.node for c in consumers), alpha, plain, errors[best]))
        if alpha is None:
            continue
        s = _scales(peaks[tensor], weight_peak, alpha)
        for consumer, w in zip(consumers, weights, strict=True):
            scaled = np.moveaxis(w * s[:, None], 0, consumer.axis).astype(np.float32)
            inits[consumer.weight].CopyFrom(numpy_helper.from_array(scaled, consumer.weight))
        _insert_mul(model, tensor, (1 / s).astype(np.float32), {c.node for c in consumers}, helper, numpy_helper)
    return records


def _insert_mul(
    model: Any, tensor: str, inverse: np.ndarray, consumers: set[str], helper: Any, numpy_helper: Any
) -> None:
    """``tensor * inverse`` as a new Mul just before the first of ``consumers``, which read its output instead."""
    graph = model.graph
    scale_name, out_name = f"{tensor}/smooth_scale", f"{tensor}/smoothed"
    graph.initializer.append(numpy_helper.from_array(inverse, scale_name))
    position = min(i for i, node in enumerate(graph.node) if node.name in consumers)
    graph.node.insert(position, helper.make_node("Mul", [tensor, scale_name], [out_name], name=f"{tensor}/SmoothMul"))
    for node in graph.node:
        if node.name in consumers:
            for i, name in enumerate(node.input):
                if name == tensor:
                    node.input[i] = out_name

"""Where N:M sparsity lives in an ONNX graph: weight initializers and their reduction axis.

ONNX stores weights in its own layouts, so the axis that N:M groups must run along depends on
the consuming operator: Conv weights ``[out, in/g, *k]`` along axis 1; Gemm ``B`` along axis 1
when ``transB=1``, else axis 0; MatMul initializers ``[..., K, N]`` along axis -2 (axis 0 for 2-D).
Exporters insert Transpose, Cast and Identity nodes between an initializer and its consumer;
this module follows those chains back to the initializer (a Transpose with perm ``[1, 0]``
swaps the axis). ``inspect`` and ``export`` both read ONNX weights through here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nmcli.patterns import Pattern, group_counts

_PASS_THROUGH = {"Cast", "Identity", "CastLike"}


@dataclass(frozen=True)
class OnnxWeight:
    """A weight initializer consumed by Conv, Gemm or MatMul, with the axis N:M must run along."""

    name: str  # initializer name
    op_type: str  # consumer
    node: str  # consumer node name
    shape: tuple[int, ...]
    axis: int  # reduction axis in the initializer's own layout
    groups: int = 1
    through: tuple[str, ...] = ()  # ops between initializer and consumer (e.g. Transpose, Cast)


def load_onnx(path: str | os.PathLike[str]) -> Any:
    """``onnx.load`` with external data, raising nmcli's own error for unreadable files."""
    import onnx

    from nmcli.errors import InputError

    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as exc:
        raise InputError(f"{path} is not a readable ONNX file ({type(exc).__name__}: {exc})") from exc


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _swaps_last_two(perm: list[int]) -> bool:
    """A Transpose that only swaps the last two axes (the default perm reverses, a swap for 2-D)."""
    if not perm:
        return True
    rank = len(perm)
    return perm == [*range(rank - 2), rank - 1, rank - 2]


def _reduction_axis(node: Any, rank: int) -> int:
    """The reduction axis of the weight input of a Conv (1), Gemm (1 with transB, else 0) or MatMul (-2)."""
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        return 1 if int(_attr(node, "transB", 0)) else 0
    return rank - 2


def find_weights(model: Any) -> list[OnnxWeight]:
    """Every initializer feeding the weight input of a Conv, Gemm or MatMul node."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    found: list[OnnxWeight] = []
    seen: set[str] = set()
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        ref = node.input[1]
        through: list[str] = []
        swapped = False
        name = ref
        while name not in inits and name in producers:
            producer = producers[name]
            if producer.op_type in _PASS_THROUGH:
                through.append(producer.op_type)
            elif producer.op_type == "Transpose" and _swaps_last_two(list(_attr(producer, "perm", []))):
                swapped = not swapped
                through.append("Transpose")
            else:
                break
            name = producer.input[0]
        if name not in inits or name in seen:
            continue
        seen.add(name)
        shape = tuple(int(d) for d in inits[name].dims)
        if len(shape) < 2:
            continue
        axis = _reduction_axis(node, len(shape))
        if swapped:
            axis = len(shape) - 1 if axis == len(shape) - 2 else len(shape) - 2
        found.append(
            OnnxWeight(name, node.op_type, node.name, shape, axis, int(_attr(node, "group", 1)), tuple(through))
        )
    return found


def initializer_tensor(model: Any, name: str) -> torch.Tensor:
    """An initializer as a torch tensor (bfloat16 and float16 kept exactly)."""
    import onnx
    from onnx import numpy_helper

    init = next(i for i in model.graph.initializer if i.name == name)
    if init.data_type == onnx.TensorProto.BFLOAT16:
        array = numpy_helper.to_array(init)
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16).astype(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(numpy_helper.to_array(init)))


def weight_compliance(values: torch.Tensor, pattern: Pattern, axis: int) -> tuple[float, bool]:
    """``(sparsity, compliant)`` of a weight along ``axis`` (``-0.0`` counts as non-zero)."""
    zeros = values.eq(0)
    if values.is_floating_point():
        zeros = zeros & ~torch.signbit(values)
    sparsity = float(zeros.float().mean()) if values.numel() else 0.0
    if values.shape[axis] % pattern.m:
        return sparsity, False
    return sparsity, bool(group_counts(values, pattern.m, axis).le(pattern.n).all())

"""Where N:M sparsity lives in an ONNX graph: weight initializers and their reduction axis.

ONNX stores weights in its own layouts, so the axis that N:M groups must run along depends on
the consuming operator: Conv weights ``[out, in/g, *k]`` along axis 1; Gemm ``B`` along axis 1
when ``transB=1``, else axis 0; MatMul initializers ``[..., K, N]`` along axis -2 (axis 0 for 2-D).
Exporters insert Transpose, Cast and Identity nodes between an initializer and its consumer;
this module follows those chains back to the initializer (a Transpose with perm ``[1, 0]``
swaps the axis). A quantized (Q/DQ) graph reaches its weights through ``DequantizeLinear``: the
int8 or float8 initializer behind it is the weight, checked for N:M like a float one (the scale
multiplies, so a zero stays a zero). ``inspect`` and ``export`` both read ONNX weights through here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nmcli.errors import InputError
from nmcli.member import check_onnx_external_data
from nmcli.nm.masks import group_counts
from nmcli.nm.pattern import Pattern

_PASS_THROUGH = {"Cast", "Identity", "CastLike"}
_DEQUANTIZE = "DequantizeLinear"
_FLOAT8_TYPES = {17, 18, 19, 20}  # FLOAT8E4M3FN, FLOAT8E4M3FNUZ, FLOAT8E5M2, FLOAT8E5M2FNUZ


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
    """``onnx.load`` with external data, raising nmcli's own error for unreadable files.

    The graph is read first and every external-data location checked to be a plain file beside it
    (:func:`nmcli.member.check_onnx_external_data`) before any of them is opened.
    """
    from onnx.external_data_helper import load_external_data_for_model

    model = check_onnx_external_data(path)
    try:
        load_external_data_for_model(model, os.path.dirname(os.fspath(path)))
        return model
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


def _picks_one(node: Any, inits: dict[str, Any]) -> bool:
    """A ``Gather`` along axis 0 by one constant scalar index: ``W[e]`` of an MoE expert stack."""
    index = inits.get(node.input[1]) if len(node.input) > 1 else None
    return int(_attr(node, "axis", 0)) == 0 and index is not None and len(index.dims) == 0


def find_weights(model: Any) -> list[OnnxWeight]:
    """Every initializer feeding the weight input of a Conv, Gemm or MatMul node.

    The chain back to the initializer passes Cast/Identity, a last-two-axes Transpose and, in a
    Q/DQ graph, ``DequantizeLinear`` (its quantized input is the weight).

    An MoE expert stack ``[E, out, in]`` that reaches its MatMul/Gemm through a ``Gather`` of one
    expert (constant index, axis 0; the dynamo exporter keeps some stacks whole) is listed once,
    with the reduction axis in the stack's own layout.
    """
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
        picked = 0  # leading dims removed by a Gather of one expert from a stack [E, ...]
        name = ref
        while name not in inits and name in producers:
            producer = producers[name]
            if producer.op_type in _PASS_THROUGH or producer.op_type == _DEQUANTIZE:
                through.append(producer.op_type)
            elif producer.op_type == "Transpose" and _swaps_last_two(list(_attr(producer, "perm", []))):
                swapped = not swapped
                through.append("Transpose")
            elif producer.op_type == "Gather" and not picked and _picks_one(producer, inits):
                picked = 1
                through.append("Gather")
            else:
                break
            name = producer.input[0]
        if name not in inits or name in seen:
            continue
        seen.add(name)
        shape = tuple(int(d) for d in inits[name].dims)
        rank = len(shape) - picked
        if rank < 2:
            continue
        axis = _reduction_axis(node, rank)
        if swapped:
            axis = rank - 1 if axis == rank - 2 else rank - 2
        axis += picked
        found.append(
            OnnxWeight(name, node.op_type, node.name, shape, axis, int(_attr(node, "group", 1)), tuple(through))
        )
    return found


def initializer_tensor(model: Any, name: str) -> torch.Tensor:
    """An initializer as a torch tensor (bfloat16 and float16 kept exactly; int8 as int8, float8 as float32)."""
    return _to_torch(next(i for i in model.graph.initializer if i.name == name))


def _to_torch(init: Any) -> torch.Tensor:
    import onnx
    from onnx import numpy_helper

    if init.data_type == onnx.TensorProto.BFLOAT16:
        array = numpy_helper.to_array(init)
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16).astype(np.int16)).view(torch.bfloat16)
    if init.data_type in _FLOAT8_TYPES:  # numpy has no float8: exact in float32 (+0.0 and -0.0 kept)
        return torch.from_numpy(np.array(numpy_helper.to_array(init)).astype(np.float32))
    return torch.from_numpy(np.array(numpy_helper.to_array(init)))


def negative_zeros(values: torch.Tensor) -> int:
    """How many elements are ``-0.0`` (0 for integer tensors)."""
    if not values.is_floating_point():
        return 0
    return int((values.eq(0) & torch.signbit(values)).sum())


def weight_compliance(values: torch.Tensor, pattern: Pattern, axis: int) -> tuple[float, bool]:
    """``(sparsity, compliant)`` of a weight along ``axis``.

    ``-0.0`` counts as zero here: it is what folding a negative BatchNorm scale into a pruned
    weight gives, and Polygraphy and TensorRT count it as zero too. Report it separately with
    :func:`negative_zeros` (sparse compressors that compare bit patterns count it as non-zero).
    """
    if values.is_floating_point():
        values = torch.where(values.eq(0), torch.zeros((), dtype=values.dtype), values)
    zeros = values.eq(0)
    sparsity = float(zeros.float().mean()) if values.numel() else 0.0
    if values.shape[axis] % pattern.m:
        return sparsity, False
    return sparsity, bool(group_counts(values, pattern.m, axis).le(pattern.n).all())


# Sign-bit-only patterns (-0.0) of the ONNX float types, as unsigned integers of the same size.
_NEGATIVE_ZERO_BITS: dict[int, tuple[type[np.unsignedinteger[Any]], int]] = {
    1: (np.uint32, 0x8000_0000),  # FLOAT
    10: (np.uint16, 0x8000),  # FLOAT16
    16: (np.uint16, 0x8000),  # BFLOAT16
    11: (np.uint64, 0x8000_0000_0000_0000),  # DOUBLE
}


def clear_negative_zeros(model: Any, names: set[str] | None = None) -> dict[str, int]:
    """Rewrite every ``-0.0`` as ``+0.0`` in the float initializers of ``model`` (in place).

    Only ``names`` when given, else every Conv/Gemm/MatMul weight initializer. Folding a
    BatchNorm with a negative scale into a pruned conv turns its pruned ``+0.0`` into ``-0.0``,
    which compressors that compare bit patterns count as non-zero. The value is unchanged.

    Returns:
        initializer name -> number of values rewritten (only those with at least one).
    """
    import onnx
    from onnx import numpy_helper

    wanted = names if names is not None else {w.name for w in find_weights(model)}
    fixed: dict[str, int] = {}
    for init in model.graph.initializer:
        if init.name not in wanted or init.data_type not in _NEGATIVE_ZERO_BITS:
            continue
        utype, bits = _NEGATIVE_ZERO_BITS[init.data_type]
        if init.raw_data:
            array = np.frombuffer(init.raw_data, dtype=utype).copy()
            negative = array == bits
            if negative.any():
                array[negative] = 0
                init.raw_data = array.tobytes()
                fixed[init.name] = int(negative.sum())
        elif init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            values = numpy_helper.to_array(init)
            negative = (values == 0) & np.signbit(values)
            if negative.any():
                init.CopyFrom(numpy_helper.from_array(np.where(negative, 0, values).astype(values.dtype), init.name))
                fixed[init.name] = int(negative.sum())
    return fixed


INPUT_SPEC_KEY = "nmcli.input"  # metadata_props key: the input spec the ONNX was exported with


def set_input_spec(model: Any, spec: str) -> None:
    """Record the input spec (``--input-shape`` syntax) in the model's ``metadata_props``."""
    set_metadata_prop(model, INPUT_SPEC_KEY, spec)


def set_metadata_prop(model: Any, key: str, value: str) -> None:
    """Set ``key`` in the model's ``metadata_props`` to ``value``, replacing an earlier value."""
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value


def stored_input_spec(path: str | os.PathLike[str]) -> str | None:
    """The input spec ``nmcli export`` recorded in an ONNX file, or None (graph only, no weights read)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by whoever opens it for real
        return None
    return next((p.value for p in model.metadata_props if p.key == INPUT_SPEC_KEY), None)


QUANTIZATION_KEY = "nmcli.quantization"  # metadata_props key: precision and calibration of a Q/DQ export


def stored_quantization(path: str | os.PathLike[str]) -> str | None:
    """The precision (``int8``, ``fp8``) of a Q/DQ ONNX ``nmcli export`` wrote, or None (graph only read)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
        value = next((p.value for p in model.metadata_props if p.key == QUANTIZATION_KEY), None)
        return str(json.loads(value)["precision"]) if value else None
    except Exception:  # noqa: BLE001 - an unreadable file or record is reported by whoever opens it for real
        return None


_FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


@dataclass(frozen=True)
class WeightMatch:
    """Where a pruned torch weight ended up in an ONNX graph.

    Attributes:
        param: the torch parameter name.
        initializer: the initializer holding it, or None when it was lost.
        op_type: the Conv/Gemm/MatMul consuming it ("" when none does).
        node: that consumer's node name.
        axis: the reduction axis in the initializer's own layout (-1 when lost).
        how: ``values`` (same values, same layout), ``transposed`` (same values, transposed),
            ``zeros`` (values changed by folding but the same zero pattern), or ``""`` when lost.
        compliant: whether the initializer is N:M along ``axis``.
        reason: why the layer counts as lost ("" when it reached a Conv/Gemm/MatMul as N:M).
    """

    param: str
    initializer: str | None
    op_type: str
    node: str
    axis: int
    how: str
    compliant: bool
    reason: str

    @property
    def lost(self) -> bool:
        return bool(self.reason)


def _nonzero(values: torch.Tensor) -> torch.Tensor:
    """Non-zero elements, ``-0.0`` counted as zero (a folded negative scale keeps the zero pattern)."""
    return values.ne(0)


def _orientations(weight: torch.Tensor, shape: tuple[int, ...]) -> list[tuple[str, torch.Tensor]]:
    """The layouts an exporter may have stored ``weight`` in that have ``shape``."""
    found = []
    if tuple(weight.shape) == shape:
        found.append(("values", weight))
    if weight.dim() == 2 and tuple(weight.t().shape) == shape:
        found.append(("transposed", weight.t()))
    return found


def locate_weights(model: Any, weights: dict[str, tuple[torch.Tensor, Pattern]]) -> list[WeightMatch]:
    """Find each pruned weight among the graph's initializers by its values, not its name.

    Exporters rename, transpose (MatMul stores ``W.T``), fold and cast weights, so a weight is
    matched by exact values in its torch layout or transposed (after casting to the
    initializer's dtype); failing that, by its zero pattern among the Conv/Gemm/MatMul weights
    (a weight scaled by a folded constant keeps its zeros). A match counts only when a Conv, Gemm
    or MatMul consumes it and it is N:M along that consumer's reduction axis; anything else is
    reported lost, with the reason. A 3-D MoE expert stack that no initializer holds whole is
    looked for expert by expert: one match per expert, named ``param[e]``.

    Args:
        model: an ``onnx.ModelProto`` (external data loaded).
        weights: torch parameter name -> (effective weight, its N:M pattern).
    """
    consumed = {w.name: w for w in find_weights(model)}
    by_numel: dict[int, list[Any]] = {}
    for init in model.graph.initializer:
        if init.data_type in _FLOAT_TYPES and len(init.dims) >= 2:
            by_numel.setdefault(int(np.prod(init.dims)), []).append(init)
    cache: dict[str, torch.Tensor] = {}

    def tensor(init: Any) -> torch.Tensor:
        if init.name not in cache:
            cache[init.name] = _to_torch(init)
        return cache[init.name]

    def locate(param: str, weight: torch.Tensor, pattern: Pattern) -> WeightMatch:
        candidates = by_numel.get(weight.numel(), [])
        exact: list[tuple[Any, str]] = []
        zeros: list[tuple[Any, str]] = []
        nonzero = _nonzero(weight)
        for init in candidates:
            shape = tuple(int(d) for d in init.dims)
            for how, view in _orientations(weight, shape):
                values = tensor(init)
                if torch.equal(values, view.to(values.dtype)):
                    exact.append((init, how))
                elif init.name in consumed and torch.equal(
                    _nonzero(values), nonzero.t() if how == "transposed" else nonzero
                ):
                    zeros.append((init, "zeros"))
        # Prefer a consumed exact match, then any consumed zero-pattern match, then an unconsumed one.
        ranked = [m for m in exact if m[0].name in consumed] + zeros + [m for m in exact if m[0].name not in consumed]
        if not ranked:
            return WeightMatch(
                param,
                None,
                "",
                "",
                -1,
                "",
                False,
                "no initializer holds its values or its zero pattern: the exporter folded, cast or fused it",
            )
        best: WeightMatch | None = None
        for init, how in ranked:
            use = consumed.get(init.name)
            if use is None:
                candidate = WeightMatch(
                    param, init.name, "", "", -1, how, False, "its initializer feeds no Conv/Gemm/MatMul weight input"
                )
            else:
                _, compliant = weight_compliance(tensor(init), pattern, use.axis)
                reason = "" if compliant else f"not {pattern} along the {use.op_type} reduction axis {use.axis}"
                candidate = WeightMatch(param, init.name, use.op_type, use.node, use.axis, how, compliant, reason)
            if best is None or (best.lost and not candidate.lost):
                best = candidate
            if not candidate.lost:
                break
        assert best is not None
        return best

    matches: list[WeightMatch] = []
    for param, (weight, pattern) in weights.items():
        match = locate(param, weight, pattern)
        if match.lost and weight.dim() == 3:
            # An MoE expert stack [E, out, in]: exporters fold W[e] into one initializer per expert.
            slices = [locate(f"{param}[{e}]", weight[e], pattern) for e in range(weight.shape[0])]
            if not any(m.lost for m in slices):
                matches.extend(slices)
                continue
        matches.append(match)
    return matches


SPARSE_LAYERS_KEY = "nmcli.sparse"  # metadata_props key: which initializers hold which pruned layers


def set_sparse_layers(model: Any, matches: Sequence[WeightMatch], patterns: Mapping[str, Pattern]) -> None:
    """Record in ``metadata_props`` which initializers hold the pruned layers, with their pattern and axis.

    The value is JSON: ``{"layers": [{"param", "initializer", "op", "axis", "n", "m"}, ...]}``, one
    entry per match that reached a Conv/Gemm/MatMul (expert slices are named ``param[e]``).
    ``patterns`` maps a torch parameter name to its pattern.
    """
    layers = []
    for m in matches:
        if m.initializer is None or m.axis < 0:
            continue
        pattern = patterns[m.param.split("[", 1)[0]]
        layers.append(
            {
                "param": m.param,
                "initializer": m.initializer,
                "op": m.op_type,
                "axis": m.axis,
                "n": pattern.n,
                "m": pattern.m,
            }
        )
    set_metadata_prop(model, SPARSE_LAYERS_KEY, json.dumps({"layers": layers}, separators=(",", ":")))


def sparse_layers(model: Any) -> dict[str, dict[str, Any]] | None:
    """The pruned layers ``nmcli export`` recorded, by initializer name; None when the file has no record.

    Raises:
        InputError: the record is not the JSON :func:`set_sparse_layers` writes.
    """

    value = next((p.value for p in model.metadata_props if p.key == SPARSE_LAYERS_KEY), None)
    if value is None:
        return None
    try:
        layers = json.loads(value)["layers"]
        return {str(entry["initializer"]): dict(entry) for entry in layers}
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"the ONNX metadata {SPARSE_LAYERS_KEY!r} is corrupt ({exc}): re-export the model with nmcli export"
        ) from exc


def gather_tables(model: Any) -> set[str]:
    """2-D initializers that feed the data input of a ``Gather`` (embedding tables), through Cast/Identity."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    found: set[str] = set()
    for node in graph.node:
        if node.op_type != "Gather" or not node.input:
            continue
        name = node.input[0]
        while name not in inits and name in producers and producers[name].op_type in _PASS_THROUGH:
            name = producers[name].input[0]
        if name in inits and len(inits[name].dims) == 2:  # not a 3-D expert stack picked by Gather
            found.add(name)
    return found


def share_tied_tables(model: Any) -> dict[str, str]:
    """Drop the copies exporters make of a tied embedding table (in place).

    A tied LM head (``lm_head.weight is embed_tokens.weight``) reaches the graph twice: the table
    feeding ``Gather`` and, constant-folded, its transpose feeding the head's ``MatMul``. Each
    float initializer equal to a ``Gather`` table, or to its transpose, is removed and its
    consumers read the table (through one ``Transpose`` node for a transposed copy).

    Returns:
        removed initializer name -> the table it duplicated.
    """
    import onnx

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    shared: dict[str, str] = {}
    for table in sorted(gather_tables(model)):
        base = inits[table]
        if len(base.dims) != 2 or base.data_type not in _FLOAT_TYPES:
            continue
        rows, cols = (int(d) for d in base.dims)
        values: torch.Tensor | None = None
        for init in list(graph.initializer):
            dims = tuple(int(d) for d in init.dims)
            if init.name == table or init.name in shared or init.data_type != base.data_type:
                continue
            if dims not in ((cols, rows), (rows, cols)):
                continue
            values = _to_torch(base) if values is None else values
            copy = _to_torch(init)
            transposed = dims == (cols, rows) and torch.equal(copy, values.t())
            if not transposed and not (dims == (rows, cols) and torch.equal(copy, values)):
                continue
            source = table
            if transposed:
                source = f"{init.name}__nmcli_tied"
                graph.node.insert(0, onnx.helper.make_node("Transpose", [table], [source], perm=[1, 0], name=source))
            for node in graph.node:
                for i, name in enumerate(node.input):
                    if name == init.name:
                        node.input[i] = source
            for listing in (graph.input, graph.value_info):
                for entry in [e for e in listing if e.name == init.name]:
                    listing.remove(entry)
            graph.initializer.remove(init)
            shared[init.name] = table
    return shared

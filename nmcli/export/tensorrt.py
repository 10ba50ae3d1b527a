"""TensorRT engines from the exported ONNX, with 2:4 sparse weights enabled.

Two API generations are supported, told apart by ``tensorrt.__version__``:

* **TensorRT 8-10** (weakly typed): precision comes from builder flags -- ``BuilderFlag.FP16``,
  ``INT8`` (``BF16`` from 9) -- and ``--sparse`` adds ``BuilderFlag.SPARSE_WEIGHTS``. TensorRT 8
  needs the ``EXPLICIT_BATCH`` network flag for ONNX; 10 is always explicit-batch.
* **TensorRT 11+**: every network is strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
  is accepted and set; ``BuilderFlag`` has no FP16/INT8/BF16 any more), so the precision must live
  in the ONNX itself: ``--precision fp16|bf16`` exports fp16/bf16 weights and the engine step adds
  only ``SPARSE_WEIGHTS``.

**INT8 and FP8 are built from a Q/DQ ONNX only** (``nmcli export --precision int8|fp8 --calib``,
:mod:`nmcli.export.quantize`): explicit quantization, the scales live in the graph, and no INT8
calibrator is set. TensorRT 8-10 get ``BuilderFlag.INT8`` (or ``FP8``) plus ``FP16`` for the layers
left float; 11+ build it strongly typed (TensorRT's "Explicit Quantization" guide: use explicit
quantization with strong typing, no precision flags). The engine report counts the pruned layers
that run a sparse INT8 tactic.

2:4 sparse tactics exist only for FP16/INT8 (and BF16) kernels on Ampere and later GPUs; TensorRT
picks a sparse kernel only where it is faster than the dense one. Which layers run one is read from
two sources (:func:`layer_status`):

1. the **engine inspector** (``ProfilingVerbosity.DETAILED``,
   ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``): ``{"Layers": [...],
   "Bindings": [...]}``, where a convolution/fully-connected layer carries ``HasSparseWeights``
   (0/1), its ``TacticName``/``TacticValue`` and, from TensorRT 8.6, ``Metadata`` naming the ONNX
   nodes it was built from (``[ONNX Layer: NAME]``, joined by ``\x1e``). TensorRT 10 compiles
   transformer graphs into Myelin layers (``LayerType: Myelin``, named ``{ForeignNode[first...last]}``,
   or Myelin's own lower-case ops such as ``gemm`` named ``..._mylN_M``) that carry no
   ``HasSparseWeights``: a pruned MatMul fused into one is reported as *fused, not attributable*
   (``sparse_kernel: null``), never silently missing;
2. the **build log**: ``(Sparsity) Layers eligible for sparse math: ...`` and
   ``(Sparsity) TRT inference plan picked sparse implementation for layers: ...``.

:func:`builder_settings` computes the whole build configuration as plain data (tested without
TensorRT); :func:`build_engine` applies it with the real ``tensorrt`` module, imported lazily;
:func:`trtexec_command` is the equivalent command line, printed when ``tensorrt`` is missing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nmcli.errors import BackendUnavailableError, InputError
from nmcli.inputs import InputSpec
from nmcli.io import atomic_output

TRT_HINT = "pip install 'nmcli[trt]' (the tensorrt wheel) on a machine with an NVIDIA GPU and driver"
_ELIGIBLE = "Layers eligible for sparse math:"
_PICKED = "TRT inference plan picked sparse implementation for layers:"
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]*)\]")
_FOREIGN_NODE = re.compile(r"\{ForeignNode\[(.*)\]\}")
_MYELIN_OP = re.compile(r"_myl\d+_\d+$")


def check_trt_precision(precision: str) -> None:
    """Refuse precisions nmcli cannot build an engine for.

    INT8 and FP8 are built only from a Q/DQ ONNX (``nmcli export --precision int8 --calib``), never
    with TensorRT's implicit INT8 calibrator.

    Raises:
        InputError: an unknown precision.
    """
    if precision not in ("fp32", "fp16", "bf16", "int8", "fp8"):
        raise InputError(f"unknown precision {precision!r}: use fp32, fp16, bf16, int8 or fp8")


@dataclass(frozen=True)
class ShapeProfile:
    """Min/opt/max shapes of one dynamic input (one TensorRT optimization profile entry)."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class BuilderSettings:
    """A TensorRT build configuration as data.

    Attributes:
        trt_major: the TensorRT major version it is for.
        network_flags: ``NetworkDefinitionCreationFlag`` names.
        flags: ``BuilderFlag`` names.
        workspace_bytes: the workspace memory-pool limit, or None for TensorRT's default.
        profiles: min/opt/max shapes of the dynamic inputs (one optimization profile).
        notes: what the user should know about this configuration.
    """

    trt_major: int
    network_flags: tuple[str, ...]
    flags: tuple[str, ...]
    workspace_bytes: int | None
    profiles: tuple[ShapeProfile, ...]
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "trt_major": self.trt_major,
            "network_flags": list(self.network_flags),
            "flags": list(self.flags),
            "workspace_bytes": self.workspace_bytes,
            "profiles": [p.to_json() for p in self.profiles],
            "notes": list(self.notes),
        }


def builder_settings(
    *,
    trt_major: int,
    precision: str,
    sparse: bool,
    spec: InputSpec,
    input_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    workspace_mb: int | None = None,
    max_batch: int | None = None,
    max_sequence: int | None = None,
) -> BuilderSettings:
    """The builder configuration for an nmcli export (a pure function).

    Args:
        trt_major: TensorRT major version (8, 9, 10 weakly typed; 11+ strongly typed).
        precision: ``fp32``, ``fp16``, ``bf16``, or ``int8``/``fp8`` for a Q/DQ ONNX.
        sparse: enable 2:4 sparse weights (``BuilderFlag.SPARSE_WEIGHTS``).
        spec: the input spec the ONNX was exported with (the optimization profile's opt shapes).
        input_names: graph input names, in spec order.
        dynamic_axes: ``{input: {axis: "batch"|"sequence"}}`` of the ONNX export.
        workspace_mb: workspace memory-pool limit in MiB.
        max_batch: the profile's largest batch (default: max(batch, 32)).
        max_sequence: the profile's longest sequence (default: the spec's).

    Raises:
        InputError: a precision this TensorRT generation cannot take from an nmcli ONNX.
    """
    check_trt_precision(precision)
    if trt_major < 8:
        raise InputError(f"TensorRT {trt_major} is too old: nmcli needs TensorRT 8.6 or newer")
    if workspace_mb is not None and workspace_mb <= 0:
        raise InputError(f"--workspace {workspace_mb} must be a positive number of MiB")
    strongly_typed = trt_major >= 11
    network_flags: list[str] = []
    if trt_major < 10:
        network_flags.append("EXPLICIT_BATCH")
    if strongly_typed:
        network_flags.append("STRONGLY_TYPED")
    flags: list[str] = []
    notes: list[str] = []
    if strongly_typed:
        pass  # the precision is the ONNX's own
    elif precision in ("int8", "fp8"):
        if precision == "fp8" and trt_major < 9:
            raise InputError("fp8 engines need TensorRT 9 or newer (and a Hopper or newer GPU): use --precision int8")
        flags += ["INT8" if precision == "int8" else "FP8", "FP16"]  # explicit Q/DQ; FP16 for the float layers
        notes.append(
            f"{precision} from the Q/DQ ONNX (explicit quantization): no calibrator, the scales are in the graph"
        )
    elif precision == "fp16":
        flags.append("FP16")
    elif precision == "bf16":
        if trt_major < 9:
            raise InputError("bf16 engines need TensorRT 9 or newer: use --precision fp16")
        flags.append("BF16")
    if sparse:
        flags.append("SPARSE_WEIGHTS")
        if precision == "fp32":
            notes.append(
                "--sparse with fp32: TensorRT has 2:4 sparse kernels only for FP16/INT8 math, so this engine "
                "will run dense kernels; use --precision fp16 to get sparse tensor-core kernels"
            )
    profiles: list[ShapeProfile] = []
    for name, tensor in zip(input_names, spec.tensors, strict=True):
        axes = dynamic_axes.get(name) or {}
        if not axes:
            continue
        shape = tuple(tensor.shape)
        lo, hi = list(shape), list(shape)
        for axis, label in axes.items():
            axis = int(axis)
            lo[axis] = 1
            if label == "batch":
                hi[axis] = max(max_batch or 32, shape[axis])
            else:
                hi[axis] = max(max_sequence or shape[axis], shape[axis])
        profiles.append(ShapeProfile(name, tuple(lo), shape, tuple(hi)))
    workspace = workspace_mb * (1 << 20) if workspace_mb else None
    return BuilderSettings(trt_major, tuple(network_flags), tuple(flags), workspace, tuple(profiles), tuple(notes))


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_command(
    onnx_path: str | os.PathLike[str], engine_path: str | os.PathLike[str], settings: BuilderSettings
) -> str:
    """The ``trtexec`` command line that builds the same engine as :func:`build_engine`."""
    parts = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if "SPARSE_WEIGHTS" in settings.flags:
        parts.append("--sparsity=enable")
    for flag, option in (("INT8", "--int8"), ("FP8", "--fp8"), ("FP16", "--fp16"), ("BF16", "--bf16")):
        if flag in settings.flags:
            parts.append(option)
    if "STRONGLY_TYPED" in settings.network_flags:
        parts.append("--stronglyTyped")
    if settings.workspace_bytes:
        parts.append(f"--memPoolSize=workspace:{settings.workspace_bytes >> 20}")
    if settings.profiles:
        for option, pick in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
            shapes = ",".join(f"{p.name}:{_dims(getattr(p, pick))}" for p in settings.profiles)
            parts.append(f"{option}={shapes}")
    return " ".join(shlex.quote(p) for p in parts)


def parse_sparsity_log(lines: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(eligible, picked)`` TensorRT layer names from the builder's ``(Sparsity)`` log lines."""
    eligible: list[str] = []
    picked: list[str] = []
    for line in lines:
        for marker, target in ((_ELIGIBLE, eligible), (_PICKED, picked)):
            if marker in line:
                rest = line.split(marker, 1)[1].strip()
                target.extend(name.strip() for name in rest.split(", ") if name.strip())
    return eligible, picked


def _layer_parts(trt_layer: str) -> set[str]:
    """The ONNX node names a (possibly fused) TensorRT layer name is made of."""
    return {part.strip() for part in trt_layer.split(" + ") if part.strip()}


@dataclass(frozen=True)
class EngineLayer:
    """One layer of the engine inspector's JSON.

    Attributes:
        name: the TensorRT layer name.
        layer_type: ``LayerType`` (``CaskConvolution``, ``CaskGemmConvolution``, ``Myelin``, ``gemm``, ...).
        onnx_nodes: the ONNX nodes it was built from (``Metadata``; else the ``" + "`` parts of its name).
        has_sparse_weights: ``HasSparseWeights`` (None when the layer has no such field).
        tactic_name: ``TacticName`` (None when absent).
        tactic_value: ``TacticValue`` (``0x...``; None when absent).
        myelin: a Myelin layer (a ``{ForeignNode[...]}`` region or one of its ops).
        foreign_range: for a ForeignNode, its first and last ONNX node (the name only gives the range).
    """

    name: str
    layer_type: str = ""
    onnx_nodes: tuple[str, ...] = ()
    has_sparse_weights: bool | None = None
    tactic_name: str | None = None
    tactic_value: str | None = None
    myelin: bool = False
    foreign_range: tuple[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layer_type": self.layer_type,
            "onnx_nodes": list(self.onnx_nodes),
            "has_sparse_weights": self.has_sparse_weights,
            "tactic_name": self.tactic_name,
            "tactic_value": self.tactic_value,
            "myelin": self.myelin,
        }


def _flag(value: Any) -> bool | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    return None


def _clean(text: str) -> str:
    # TensorRT 8.6/10 separate records and units with \x1e / \x1f (trt-engine-explorer replaces them too)
    return text.replace("\x1e", " ").replace("\x1f", " ")


def parse_engine_information(info: str | Mapping[str, Any]) -> list[EngineLayer]:
    """The layers of the engine inspector's JSON (``get_engine_information(LayerInformationFormat.JSON)``).

    Accepts the JSON text or its parsed object. With ``ProfilingVerbosity.LAYER_NAMES_ONLY`` the
    layers are bare names (no sparse information). Layers of further optimization profiles
    (``... [profile N]``) are kept: they are the same ONNX nodes.

    Raises:
        ValueError: text that is not the inspector's JSON.
    """
    data = json.loads(info) if isinstance(info, str) else info
    if not isinstance(data, Mapping) or not isinstance(data.get("Layers"), list):
        raise ValueError('not an engine-inspector JSON: expected {"Layers": [...]}')
    layers: list[EngineLayer] = []
    for raw in data["Layers"]:
        if isinstance(raw, str):
            name = _clean(raw)
            if _FOREIGN_NODE.search(name) or _MYELIN_OP.search(name):
                layers.append(EngineLayer(name, myelin=True))
            else:
                layers.append(EngineLayer(name, onnx_nodes=tuple(sorted(_layer_parts(name)))))
            continue
        if not isinstance(raw, Mapping):
            continue
        name = _clean(str(raw.get("Name", "")))
        layer_type = str(raw.get("LayerType", ""))
        foreign = _FOREIGN_NODE.search(name)
        myelin = layer_type == "Myelin" or foreign is not None or bool(_MYELIN_OP.search(name))
        metadata = str(raw.get("Metadata") or "")
        nodes = [n.strip() for n in _ONNX_LAYER.findall(metadata) if n.strip()]
        if not nodes and not myelin:
            nodes = sorted(_layer_parts(name))
        span: tuple[str, str] | None = None
        if foreign is not None:
            first, _, last = foreign.group(1).partition("...")
            span = (first.strip(), (last or first).strip())
        tactic_value = raw.get("TacticValue", raw.get("Tactic"))
        layers.append(
            EngineLayer(
                name=name,
                layer_type=layer_type,
                onnx_nodes=tuple(dict.fromkeys(nodes)),
                has_sparse_weights=_flag(raw.get("HasSparseWeights")),
                tactic_name=str(raw["TacticName"]) if raw.get("TacticName") else None,
                tactic_value=str(tactic_value) if tactic_value is not None else None,
                myelin=myelin,
                foreign_range=span,
            )
        )
    return layers


def layer_status(
    nodes: Mapping[str, str],
    eligible: Sequence[str],
    picked: Sequence[str],
    inspector: Sequence[EngineLayer] = (),
) -> list[dict[str, Any]]:
    """Per pruned parameter: its ONNX node, whether TensorRT found it eligible, and whether it runs a sparse kernel.

    The inspector's ``HasSparseWeights`` decides where the node is in a non-Myelin layer that has the
    field; else the build log (``picked`` / ``eligible``). A node inside a Myelin layer (by its
    ``Metadata``), or absent from every layer of an engine that has Myelin layers, is
    ``sparse_kernel: None`` with the evidence "fused into a Myelin layer, not attributable".

    Args:
        nodes: pruned torch parameter -> the ONNX node consuming its weight.
        eligible: TensorRT layer names eligible for sparse math (build log).
        picked: TensorRT layer names that picked a sparse kernel (build log).
        inspector: :func:`parse_engine_information` of the built engine (empty if unavailable).
    """
    eligible_parts = set().union(*(_layer_parts(n) for n in eligible)) if eligible else set()
    picked_parts = set().union(*(_layer_parts(n) for n in picked)) if picked else set()
    myelin_layers = [layer for layer in inspector if layer.myelin]
    rows: list[dict[str, Any]] = []
    for param, node in nodes.items():
        holders = [layer for layer in inspector if node in layer.onnx_nodes]
        direct = [layer for layer in holders if not layer.myelin and layer.has_sparse_weights is not None]
        row: dict[str, Any] = {"param": param, "node": node, "eligible": node in eligible_parts}
        if direct:
            sparse = any(layer.has_sparse_weights for layer in direct)
            layer = next((x for x in direct if x.has_sparse_weights), direct[0])
            row.update(
                sparse_kernel=sparse,
                engine_layer=layer.name,
                evidence=f"engine inspector: HasSparseWeights={int(sparse)}, tactic {layer.tactic_name or layer.tactic_value or '?'}",
            )
        elif node in picked_parts:
            row.update(sparse_kernel=True, engine_layer=None, evidence="build log: picked a sparse implementation")
        elif any(layer.myelin for layer in holders) or (myelin_layers and not holders):
            fused = next((x for x in holders if x.myelin), myelin_layers[0] if myelin_layers else None)
            where = f" {fused.name}" if fused is not None else ""
            row.update(
                sparse_kernel=None,
                engine_layer=fused.name if fused is not None else None,
                evidence=f"fused into a Myelin layer{where}: not attributable (Myelin reports no per-MatMul sparsity)",
            )
        elif node in eligible_parts:
            row.update(
                sparse_kernel=False, engine_layer=None, evidence="build log: eligible, a dense kernel was faster"
            )
        else:
            row.update(
                sparse_kernel=False,
                engine_layer=holders[0].name if holders else None,
                evidence="not eligible for sparse math (not in the build log's (Sparsity) lines)",
            )
        rows.append(row)
    return rows


@dataclass
class EngineBuild:
    """A built TensorRT engine and what TensorRT did with the sparse layers.

    Attributes:
        path: the ``.engine`` plan.
        trt_version: ``tensorrt.__version__``.
        settings: the configuration used.
        eligible: TensorRT layers eligible for sparse math (build log).
        picked: TensorRT layers that picked sparse kernels (build log and engine inspector).
        layers: per pruned parameter, see :func:`layer_status`.
        log: warnings and errors TensorRT logged.
        inspector: the engine inspector's layers (empty when it was unavailable).
    """

    path: Path
    trt_version: str
    settings: BuilderSettings
    eligible: list[str] = field(default_factory=list)
    picked: list[str] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    inspector: list[EngineLayer] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "tensorrt": self.trt_version,
            "settings": self.settings.to_json(),
            "eligible": self.eligible,
            "picked": self.picked,
            "layers": self.layers,
            "myelin_layers": [layer.name for layer in self.inspector if layer.myelin],
            "sparse_tactic_layers": sum(1 for row in self.layers if row.get("sparse_kernel")),
            "eligible_layers": sum(1 for row in self.layers if row.get("eligible")),
            "warnings": self.log,
        }


def import_tensorrt() -> Any:
    """The ``tensorrt`` module.

    Raises:
        BackendUnavailableError: it is not installed or does not load (no CUDA driver).
    """
    try:
        import tensorrt
    except Exception as exc:  # ImportError, or a wheel that cannot find libnvinfer / the driver
        raise BackendUnavailableError(f"the tensorrt package is not available ({exc}): {TRT_HINT}") from exc
    return tensorrt


def tensorrt_major(trt: Any) -> int:
    """The major version of an imported ``tensorrt`` module."""
    return int(str(trt.__version__).split(".")[0])


def collecting_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` that prints nothing and keeps what TensorRT says.

    ``lines``: INFO and more severe messages, and every ``(Sparsity)`` message whatever its level;
    ``problems``: warnings and errors (shown to the user by the caller, never hidden).
    Severities are compared as integers (``INTERNAL_ERROR`` 0 ... ``VERBOSE`` 4).
    """
    info_level = int(trt.ILogger.Severity.INFO)
    warning_level = int(trt.ILogger.Severity.WARNING)

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[str] = []
            self.problems: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)
            if "(Sparsity)" in msg or level <= info_level:
                self.lines.append(msg)
            if level <= warning_level:
                self.problems.append(msg)

    return _Logger()


def inspect_engine(trt: Any, plan: bytes, logger: Any) -> list[EngineLayer]:
    """The engine inspector's layers of a serialized engine (empty if the inspector is unavailable)."""
    try:
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        inspector = engine.create_engine_inspector()
        text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        return parse_engine_information(text)
    except Exception:  # noqa: BLE001 - the inspector is a report, never a reason to fail a finished build
        return []


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    settings: BuilderSettings,
    *,
    pruned_nodes: Mapping[str, str] | None = None,
    force: bool = False,
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> EngineBuild:
    """Build a TensorRT engine from ``onnx_path`` with ``settings`` and write the plan atomically.

    Args:
        onnx_path: the exported ONNX (external data beside it is read too).
        engine_path: the ``.engine`` output.
        settings: from :func:`builder_settings` for the installed TensorRT.
        pruned_nodes: pruned torch parameter -> ONNX node, for the per-layer sparse report.
        force: overwrite an existing plan.
        inputs: input files that must not be overwritten.

    Raises:
        BackendUnavailableError: tensorrt is missing.
        InputError: TensorRT cannot parse the ONNX or build the engine (its errors are quoted).
    """
    trt = import_tensorrt()
    logger = collecting_logger(trt)
    builder = trt.Builder(logger)
    network_flags = 0
    for name in settings.network_flags:
        network_flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise InputError(f"TensorRT cannot parse {onnx_path}: {'; '.join(errors[:3]) or 'no error given'}")
    config = builder.create_builder_config()
    for name in settings.flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if settings.workspace_bytes:
        if hasattr(config, "set_memory_pool_limit"):
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
        else:  # TensorRT < 8.4
            config.max_workspace_size = settings.workspace_bytes
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if settings.profiles:
        profile = builder.create_optimization_profile()
        for p in settings.profiles:
            profile.set_shape(p.name, p.min, p.opt, p.max)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise InputError(
            f"TensorRT could not build an engine from {onnx_path}: {'; '.join(logger.problems[-3:]) or 'see its log'}"
        )
    data = bytes(memoryview(plan))
    with atomic_output(engine_path, force=force, inputs=inputs) as tmp:
        tmp.write_bytes(data)
    eligible, picked = parse_sparsity_log(logger.lines)
    engine_layers = inspect_engine(trt, data, logger)
    for layer in engine_layers:
        if layer.has_sparse_weights and layer.name not in picked:
            picked.append(layer.name)
    return EngineBuild(
        Path(engine_path),
        str(trt.__version__),
        settings,
        eligible,
        picked,
        layer_status(pruned_nodes or {}, eligible, picked, engine_layers),
        [p for p in logger.problems if p][:20],
        engine_layers,
    )

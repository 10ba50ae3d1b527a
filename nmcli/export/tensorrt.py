"""TensorRT engines from the exported ONNX, with 2:4 sparse weights enabled.

Two API generations are supported, told apart by ``tensorrt.__version__``:

* **TensorRT 8-10** (weakly typed): precision comes from builder flags -- ``BuilderFlag.FP16``,
  ``INT8`` (``BF16`` from 9) -- and ``--sparse`` adds ``BuilderFlag.SPARSE_WEIGHTS``. TensorRT 8
  needs the ``EXPLICIT_BATCH`` network flag for ONNX; 10 is always explicit-batch.
* **TensorRT 11+**: every network is strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
  is accepted and set; ``BuilderFlag`` has no FP16/INT8/BF16 any more), so the precision must live
  in the ONNX itself: ``--precision fp16|bf16`` exports fp16/bf16 weights and the engine step adds
  only ``SPARSE_WEIGHTS``. INT8 needs Q/DQ nodes in the ONNX there, which nmcli does not write.

2:4 sparse tactics exist only for FP16/INT8 (and BF16) kernels on Ampere and later GPUs; TensorRT
picks a sparse kernel only where it is faster than the dense one. The build log says which layers
were eligible (``(Sparsity) Layers eligible for sparse math: ...``) and which got sparse kernels
(``(Sparsity) TRT inference plan picked sparse implementation for layers: ...``); the engine
inspector (``ProfilingVerbosity.DETAILED``) names each layer's tactic.

:func:`builder_settings` computes the whole build configuration as plain data (tested without
TensorRT); :func:`build_engine` applies it with the real ``tensorrt`` module, imported lazily;
:func:`trtexec_command` is the equivalent command line, printed when ``tensorrt`` is missing.
"""

from __future__ import annotations

import json
import os
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
        precision: ``fp32``, ``fp16``, ``bf16`` or ``int8``.
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
        if precision == "int8":
            raise InputError(
                "TensorRT 11 builds INT8 only from Q/DQ nodes in the ONNX, which nmcli does not write: "
                "use --precision fp16, or quantize the ONNX with TensorRT Model Optimizer"
            )
    elif precision == "fp16":
        flags.append("FP16")
    elif precision == "bf16":
        if trt_major < 9:
            raise InputError("bf16 engines need TensorRT 9 or newer: use --precision fp16")
        flags.append("BF16")
    elif precision == "int8":
        flags += ["INT8", "FP16"]
        notes.append(
            "int8 without calibration data: TensorRT falls back to FP16 for tensors without dynamic ranges; "
            "for real INT8 give it a calibrated or Q/DQ ONNX"
        )
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
    for flag, option in (("FP16", "--fp16"), ("BF16", "--bf16"), ("INT8", "--int8")):
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


def layer_status(nodes: Mapping[str, str], eligible: Sequence[str], picked: Sequence[str]) -> list[dict[str, Any]]:
    """Per pruned parameter: its ONNX node, and whether TensorRT found it eligible / picked a sparse kernel.

    Args:
        nodes: pruned torch parameter -> the ONNX node consuming its weight.
        eligible: TensorRT layer names eligible for sparse math.
        picked: TensorRT layer names that run a sparse kernel.
    """
    eligible_parts = set().union(*(_layer_parts(n) for n in eligible)) if eligible else set()
    picked_parts = set().union(*(_layer_parts(n) for n in picked)) if picked else set()
    return [
        {"param": param, "node": node, "eligible": node in eligible_parts, "sparse_kernel": node in picked_parts}
        for param, node in nodes.items()
    ]


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
    """

    path: Path
    trt_version: str
    settings: BuilderSettings
    eligible: list[str] = field(default_factory=list)
    picked: list[str] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "tensorrt": self.trt_version,
            "settings": self.settings.to_json(),
            "eligible": self.eligible,
            "picked": self.picked,
            "layers": self.layers,
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


def _make_logger(trt: Any) -> Any:
    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[str] = []
            self.problems: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if "(Sparsity)" in msg or severity <= trt.ILogger.Severity.INFO:
                self.lines.append(msg)
            if severity <= trt.ILogger.Severity.WARNING:
                self.problems.append(msg)

    return _Logger()


def _inspector_sparse_layers(trt: Any, plan: bytes, logger: Any) -> list[str]:
    """Layers whose tactic is a sparse kernel, from the engine inspector (empty if unavailable)."""
    try:
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        inspector = engine.create_engine_inspector()
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception:  # noqa: BLE001 - the inspector is a report, never a reason to fail a finished build
        return []
    found = []
    for layer in info.get("Layers", []):
        if isinstance(layer, dict):
            tactic = str(layer.get("TacticName", "")) + " " + str(layer.get("Tactic", ""))
            if "sparse" in tactic.lower():
                found.append(str(layer.get("Name", "")))
    return found


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
    logger = _make_logger(trt)
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
    for name in _inspector_sparse_layers(trt, data, logger):
        if name not in picked:
            picked.append(name)
    return EngineBuild(
        Path(engine_path),
        str(trt.__version__),
        settings,
        eligible,
        picked,
        layer_status(pruned_nodes or {}, eligible, picked),
        [p for p in logger.problems if p][:20],
    )

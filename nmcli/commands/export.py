"""``nmcli export``: ONNX (sparsity checked, verified), TensorRT engines and compressed checkpoints.

:func:`run_export` is the whole command: it rebuilds the model from the checkpoint (effective
weights), exports it with :mod:`nmcli.export.onnx`, finds every pruned layer's weight in the graph
by value (:func:`nmcli.formats.onnx_layout.locate_weights`), verifies the file in onnxruntime
(:mod:`nmcli.export.verify`), and builds a TensorRT engine (:mod:`nmcli.export.tensorrt`) or, when
``tensorrt`` is missing, gives the equivalent ``trtexec`` command. ``--compress`` writes the
compressed copy of :mod:`nmcli.nm.codec`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nmcli.errors import BackendUnavailableError, CheckFailedError, InputError, NoArchitectureError

if TYPE_CHECKING:
    from nmcli.export.onnx import OnnxExport
    from nmcli.export.quantize import QuantizedOnnx
    from nmcli.export.tensorrt import BuilderSettings, EngineBuild
    from nmcli.export.verify import VerifyResult
    from nmcli.formats.onnx_layout import WeightMatch
    from nmcli.inputs import InputSpec
    from nmcli.models.sources import LoadedModel
from nmcli.formats.open import Form, InputKind, classify, compress_checkpoint
from nmcli.formats.sharded import check_output_directory
from nmcli.formats.sharded_compress import compress_directory, directory_bytes
from nmcli.io import check_output_path
from nmcli.progress import ProgressCallback

DEFAULT_QUANT_SAMPLES = 128


@dataclass(frozen=True)
class ExportPaths:
    """Where ``nmcli export`` writes: the ONNX file, the engine and the compressed checkpoint (None = not written)."""

    onnx: Path | None
    engine: Path | None
    compressed: Path | None

    def all(self) -> list[Path]:
        return [p for p in (self.onnx, self.engine, self.compressed) if p is not None]


def export_paths(
    checkpoint: str,
    *,
    onnx: bool,
    trt: bool,
    compress: bool,
    output: str | os.PathLike[str] | None,
    precision: str = "fp32",
    kind: InputKind | None = None,
) -> ExportPaths:
    """The output paths for the requested artifacts (a pure function).

    With no artifact flag, ``--onnx`` is implied; ``--trt`` writes the ONNX too. ``-o`` names the
    main artifact: ``x.onnx`` (the engine goes to ``x.engine``), ``x.engine`` (the ONNX to
    ``x.onnx``), or ``x.safetensors`` for ``--compress`` alone (a directory name when the checkpoint
    is a sharded directory). Defaults sit beside the checkpoint: ``model-2of4.onnx``,
    ``model-2of4.engine``, ``model-2of4-compressed.safetensors`` (``DIR-compressed/`` for a sharded
    directory ``DIR``); other
    precisions than fp32 name theirs (``model-2of4-fp16.onnx``, ``model-2of4-int8.engine``), so
    exports in several precisions sit side by side.

    ``kind`` is the checkpoint's :func:`nmcli.formats.open.classify` (classified here when not given).

    Raises:
        InputError: ``-o`` has a suffix that does not fit the requested artifacts.
    """
    from nmcli.models.sources import default_output_path

    want_onnx = onnx or trt or not compress
    onnx_tag = precision if precision in ("fp16", "bf16", "int8", "fp8") else ""  # int8/fp8: the Q/DQ ONNX
    onnx_path = default_output_path(checkpoint, onnx_tag, ".onnx") if want_onnx else None
    kind = kind or classify(checkpoint)
    sharded = kind.form is Form.SHARDED_CHECKPOINT  # compressed into a directory
    compressed_suffix = "" if sharded else ".safetensors"
    compressed = default_output_path(checkpoint, "compressed", compressed_suffix) if compress else None
    if output is not None:
        out = Path(output)
        suffix = out.suffix.lower()
        if suffix == ".onnx" and want_onnx:
            onnx_path = out
        elif suffix in (".engine", ".plan", ".trt") and trt:
            onnx_path = out.with_suffix(".onnx")
            return ExportPaths(onnx_path, out, compressed)
        elif compress and not want_onnx and (suffix == ".safetensors") != sharded:
            compressed = out
        else:
            if not want_onnx and sharded:
                raise InputError(
                    f"-o {out}: {checkpoint} is a sharded checkpoint directory and is compressed into a "
                    "directory: give -o a directory name, not a .safetensors file"
                )
            wanted = ".onnx" + (" or .engine" if trt else "") if want_onnx else ".safetensors"
            raise InputError(f"-o {out} does not fit what you asked to export: give a path ending in {wanted}")
    engine = None
    if trt and onnx_path is not None:
        engine = onnx_path.with_suffix(".engine")

    return ExportPaths(onnx_path, engine, compressed)


def second_spec(spec: InputSpec) -> InputSpec:
    """Another shape to verify a dynamic export with: batch + 2, and half the sequence for text models."""
    from nmcli.export.onnx import text_inputs
    from nmcli.inputs import InputSpec as _InputSpec
    from nmcli.inputs import InputTensor

    batch = spec.batch_size + 2
    if not text_inputs(spec):
        return spec.with_batch(batch)
    seq = spec.tensors[0].shape[1]
    new_seq = max(2, seq // 2) if seq > 2 else seq + 2
    return _InputSpec(tuple(InputTensor(t.name, (batch, new_seq), t.dtype) for t in spec.tensors))


@dataclass
class ExportResult:
    """Everything ``nmcli export`` produced and found.

    Attributes:
        paths: the outputs.
        precision: the requested precision.
        sparse: whether sparse weights were enabled for TensorRT.
        onnx: the ONNX export, when written.
        matches: where each pruned layer's weight went in the graph.
        verify: the onnxruntime-vs-torch check, when run.
        engine: the TensorRT build, when tensorrt is installed.
        settings: the TensorRT builder configuration (also without tensorrt).
        trtexec: the equivalent trtexec command (always given with --trt).
        trt_missing: why tensorrt could not be used, when it could not.
        compressed_bytes: size of the compressed checkpoint, and ``original_bytes`` of the input.
        quantized: the Q/DQ export (``--precision int8|fp8``): its sparse weights and agreement.
        notes: neutral information; ``warnings``: things that likely need action.
    """

    paths: ExportPaths
    precision: str
    sparse: bool
    onnx: OnnxExport | None = None
    matches: list[WeightMatch] = field(default_factory=list)
    verify: VerifyResult | None = None
    engine: EngineBuild | None = None
    settings: BuilderSettings | None = None
    trtexec: str | None = None
    trt_missing: str | None = None
    compressed_bytes: int | None = None
    original_bytes: int | None = None
    quantized: QuantizedOnnx | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def lost_layers(self) -> list[str]:
        return [m.param for m in self.matches if m.lost]

    @property
    def verified(self) -> bool | None:
        return self.verify.passed if self.verify is not None else None

    def to_json(self) -> dict[str, Any]:
        return {
            "onnx": str(self.paths.onnx) if self.onnx is not None else None,
            "engine": str(self.engine.path) if self.engine is not None else None,
            "verified": self.verified,
            "max_abs_diff": self.verify.max_abs_diff if self.verify is not None else None,
            "sparse_initializers": [
                {"param": m.param, "initializer": m.initializer, "op": m.op_type, "axis": m.axis, "match": m.how}
                for m in self.matches
                if not m.lost
            ],
            "lost_layers": self.lost_layers,
            "lost_reasons": {m.param: m.reason for m in self.matches if m.lost},
            "precision": self.precision,
            "sparse": self.sparse,
            "exporter": self.onnx.exporter if self.onnx is not None else None,
            "opset": self.onnx.opset if self.onnx is not None else None,
            "external_data": str(self.onnx.data_path) if self.onnx is not None and self.onnx.data_path else None,
            "verify": self.verify.to_json() if self.verify is not None else None,
            "tensorrt": self.engine.to_json() if self.engine is not None else None,
            "builder": self.settings.to_json() if self.settings is not None else None,
            "trtexec": self.trtexec,
            "compressed": str(self.paths.compressed) if self.compressed_bytes is not None else None,
            "compressed_bytes": self.compressed_bytes,
            "original_bytes": self.original_bytes,
            "quantization": self.quantized.to_json() if self.quantized is not None else None,
            "notes": self.notes,
            "warnings": self.warnings,
        }

    def raise_for_status(self) -> None:
        """Raise the error the command ends with, after its results were shown.

        Raises:
            CheckFailedError: verification found a mismatch outside the tolerance (exit 1).
            BackendUnavailableError: --trt without tensorrt installed (exit 3).
        """
        if self.verify is not None and self.verify.passed is False:
            raise CheckFailedError(
                f"{self.paths.onnx} differs from the torch model: {self.verify.summary()}; "
                "raise --atol/--rtol if that is expected for this precision"
            )
        if self.trt_missing is not None:
            raise BackendUnavailableError(
                f"{self.trt_missing}. The ONNX file {self.paths.onnx} is written; build the engine with: {self.trtexec}"
            )


def _effective_in(weight: Any, dtype: Any) -> Any:
    import torch

    cast = weight.to(dtype)
    return torch.where(cast == 0, torch.zeros((), dtype=cast.dtype), cast)


class _Steps:
    """``progress(done, total, label)`` for the export's steps, one call as each begins."""

    def __init__(self, progress: ProgressCallback | None, paths: ExportPaths, verify: bool) -> None:
        self.progress = progress
        self.total = sum(1 for p in (paths.compressed, paths.onnx, paths.onnx if verify else None, paths.engine) if p)
        self.done = 0

    def __call__(self, label: str) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total, label)
        self.done += 1

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.total, self.total, "done")


def run_export(
    checkpoint: str,
    *,
    onnx: bool = False,
    trt: bool = False,
    sparse: bool = False,
    precision: str = "fp32",
    input_shape: str | None = None,
    dynamic_batch: bool = False,
    opset: int | None = None,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    workspace_mb: int | None = None,
    compress: bool = False,
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    exporter: str = "auto",
    progress: ProgressCallback | None = None,
    arch: str | None = None,
    trust: bool = False,
    calib: str | None = None,
    calib_samples: int = DEFAULT_QUANT_SAMPLES,
    calib_method: str = "max",
    model_class: str = "auto",
) -> ExportResult:
    """``nmcli export``: see the module docstring. Errors that end the command after its results
    (verification mismatch, missing tensorrt) are left to :meth:`ExportResult.raise_for_status`.

    ``arch`` overrides the checkpoint's recorded source (the user's own ``--arch``); ``trust``
    (``--trust``) lets a recorded ``py:`` or pickled source run (DESIGN.md section 7).
    ``precision`` ``int8``/``fp8`` writes a Q/DQ ONNX calibrated on ``calib`` (``calib_samples``
    examples, ``calib_method``; see :mod:`nmcli.export.quantize`). ``model_class``: see :mod:`nmcli.models.hfclass`.

    Raises:
        InputError: bad options or input.
        TrustRequiredError: the checkpoint's recorded source is code, without ``trust``, ``arch``
            or a trust-store entry for it.
        ExportUnsupportedError: torch cannot export the model, which runs in torch (exit 3).
        OutputExistsError: an output exists without ``force`` or names the input.
    """
    from nmcli.export.onnx import precision_dtype
    from nmcli.export.quantize import QUANT_PRECISIONS, check_quant_options
    from nmcli.export.tensorrt import check_trt_precision
    from nmcli.export.verify import default_tolerances
    from nmcli.inputs import parse_input_spec

    dtype = precision_dtype(precision)
    check_trt_precision(precision)
    check_quant_options(precision, calib, calib_method)  # int8 without --calib: exit 2 before anything is written
    if calib_samples < 1:
        raise InputError(f"--calib-samples {calib_samples} must be at least 1")
    default_atol, default_rtol = default_tolerances(precision)
    _check_numbers(workspace_mb, atol, rtol)
    spec_override = parse_input_spec(input_shape) if input_shape else None
    kind = classify(checkpoint)
    if kind.named is Form.ONNX:
        raise InputError(
            f"{checkpoint} is already an ONNX file: export takes an nmcli checkpoint or a model source; "
            "inspect it with nmcli inspect, or time it with nmcli bench"
        )
    paths = export_paths(
        checkpoint, onnx=onnx, trt=trt, compress=compress, output=output, precision=precision, kind=kind
    )
    if model_class != "auto" and paths.onnx is None:
        raise InputError(f"--model-class {model_class!r}: --compress alone builds no model: drop --model-class")
    local_input = kind.path if kind.path is not None else Path(checkpoint)
    _check_outputs(paths, kind, local_input, force)
    result = ExportResult(paths, precision, sparse)
    step = _Steps(progress, paths, verify)
    if paths.compressed is not None:
        step("compressing")
        _compress(kind, paths.compressed, force, result)
    if paths.onnx is None:
        return result
    step("exporting ONNX")
    if precision in QUANT_PRECISIONS:
        assert calib is not None
        job = _export_quantized(
            kind, paths.onnx, result, calib=calib, samples=calib_samples, method=calib_method,
            spec_override=spec_override, dynamic_batch=dynamic_batch, opset=opset, exporter=exporter,
            force=force, arch=arch, trust=trust, model_class=model_class,
        )  # fmt: skip
        if paths.engine is not None:
            _engine(job, paths.onnx, paths.engine, result, step, workspace_mb=workspace_mb, force=force)
        step.finish()
        return result
    job = _export_onnx(
        kind, paths.onnx, result, dtype=dtype, spec_override=spec_override, dynamic_batch=dynamic_batch,
        opset=opset, exporter=exporter, force=force, verify=verify, arch=arch, trust=trust, model_class=model_class,
    )  # fmt: skip
    if verify:
        step("verifying in onnxruntime")
        _verify(job, paths.onnx, result, dynamic_batch=dynamic_batch,
                atol=default_atol if atol is None else atol, rtol=default_rtol if rtol is None else rtol)  # fmt: skip
    if paths.engine is not None:
        _engine(job, paths.onnx, paths.engine, result, step, workspace_mb=workspace_mb, force=force)
    step.finish()
    return result


def _check_numbers(workspace_mb: int | None, atol: float | None, rtol: float | None) -> None:
    """``--workspace``, ``--atol`` and ``--rtol`` in range, before anything is read or written."""
    if workspace_mb is not None and workspace_mb <= 0:
        raise InputError(f"--workspace {workspace_mb} must be a positive number of MiB")
    for name, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InputError(f"{name} {value}: give a finite number >= 0")


def _check_outputs(paths: ExportPaths, kind: InputKind, local_input: Path, force: bool) -> None:
    """Every output writable, none the input; a sharded checkpoint's compressed copy is a directory."""
    for path in paths.all():
        if kind.form is Form.SHARDED_CHECKPOINT and path == paths.compressed:  # replaced only if it is nmcli's
            check_output_directory(path, force=force, inputs=[local_input])
        else:
            check_output_path(path, force=force, inputs=[local_input])


def _compress(kind: InputKind, out: Path, force: bool, result: ExportResult) -> None:
    """``--compress``: a sharded checkpoint shard by shard, one tensor at a time; a file whole.

    Raises:
        InputError: the input is not an nmcli checkpoint.
    """
    if kind.form is Form.SHARDED_CHECKPOINT and kind.path is not None:
        compress_directory(kind.path, out, force=force)
        result.original_bytes = directory_bytes(kind.path)
        result.compressed_bytes = directory_bytes(out)
        return
    if kind.prefix or kind.path is None or kind.form not in (Form.CHECKPOINT, Form.COMPRESSED):
        raise InputError(
            "--compress needs an nmcli checkpoint (.safetensors written by nmcli prune, or a sharded "
            f"checkpoint directory): {kind.spec} is not one"
        )
    compress_checkpoint(kind.path, out, force=force)
    result.original_bytes = os.path.getsize(kind.path)
    result.compressed_bytes = os.path.getsize(out)


@dataclass
class _OnnxJob:
    """What the later steps need from the ONNX export: the model, its input spec and the checkpoint."""

    loaded: LoadedModel
    spec: InputSpec
    local_input: Path


def _export_onnx(
    kind: InputKind,
    out: Path,
    result: ExportResult,
    *,
    dtype: Any,
    spec_override: InputSpec | None,
    dynamic_batch: bool,
    opset: int | None,
    exporter: str,
    force: bool,
    verify: bool,
    arch: str | None,
    trust: bool,
    loaded: LoadedModel | None = None,
    model_class: str = "auto",
) -> _OnnxJob:
    """Rebuild the model (unless ``loaded``), export it to ``out`` with its pruned layers located in the graph; notes and
    warnings go to ``result``.

    Raises:
        InputError: no input shape stored or given.
    """
    from nmcli.export.onnx import export_onnx

    checkpoint = kind.spec
    local_input = kind.path if kind.path is not None else Path(checkpoint)
    loaded = loaded or _load_for_export(checkpoint, arch, trust, model_class)
    spec = spec_override or loaded.input_spec
    if spec is None:
        raise InputError(
            f"{checkpoint} stores no input shape: pass --input-shape, e.g. 1x3x224x224 "
            "(or input_ids:1x128:int64,attention_mask:1x128:int64 for text models)"
        )
    ckpt = loaded.checkpoint
    if ckpt is None or not ckpt.meta.layers:
        result.notes.append(f"{checkpoint} has no pruned layers: the export is dense")
    # Located in the graph and recorded in its metadata_props by export_onnx (inspect reads them).
    weights = (
        {e.param: (_effective_in(ckpt.tensors[e.param], dtype), e.pattern) for e in ckpt.meta.layers}
        if ckpt is not None
        else {}
    )
    result.onnx = export_onnx(
        loaded.model,
        spec,
        out,
        precision=result.precision,
        dynamic_batch=dynamic_batch,
        opset=opset,
        exporter=exporter,
        force=force,
        inputs=[local_input],
        pruned=weights,
        also_runs_on=[second_spec(spec)] if dynamic_batch and verify else [],
    )
    result.notes += result.onnx.notes
    if weights:
        result.matches = result.onnx.matches
        lost = [m for m in result.matches if m.lost]
        if lost:
            names = ", ".join(f"{m.param} ({m.reason})" for m in lost[:10])
            more = f" and {len(lost) - 10} more" if len(lost) > 10 else ""
            result.warnings.append(
                f"{len(lost)} of {len(result.matches)} pruned layer(s) did not reach the ONNX graph as N:M "
                f"initializers, so TensorRT cannot run them sparse: {names}{more}"
            )
    return _OnnxJob(loaded, spec, local_input)


def _verify(
    job: _OnnxJob, onnx_path: Path, result: ExportResult, *, dynamic_batch: bool, atol: float, rtol: float
) -> None:
    """Run the ONNX file in onnxruntime against the torch model (a second shape with ``dynamic_batch``)."""
    from nmcli.export.onnx import vocab_size_of
    from nmcli.export.verify import verify_onnx

    specs = [job.spec, second_spec(job.spec)] if dynamic_batch else [job.spec]
    result.verify = verify_onnx(
        onnx_path, job.loaded.model, specs, atol=atol, rtol=rtol, vocab_size=vocab_size_of(job.loaded.model)
    )
    if result.verify.skipped:
        result.warnings.append(f"not verified: {result.verify.skipped}")


def _engine(
    job: _OnnxJob,
    onnx_path: Path,
    engine_path: Path,
    result: ExportResult,
    step: _Steps,
    *,
    workspace_mb: int | None,
    force: bool,
) -> None:
    """The TensorRT builder settings and ``trtexec`` line, and the engine when tensorrt is installed
    and verification did not fail (``result.trt_missing`` says why not)."""
    from nmcli.export.onnx import max_sequence_of
    from nmcli.export.tensorrt import build_engine, builder_settings, import_tensorrt, tensorrt_major, trtexec_command

    ckpt, sparse = job.loaded.checkpoint, result.sparse
    if ckpt is not None and ckpt.meta.layers and not sparse:
        result.notes.append(
            "the checkpoint is pruned but --sparse is off: the engine will be dense; pass --sparse to let "
            "TensorRT use 2:4 sparse tensor-core kernels"
        )
    if ckpt is not None and ckpt.meta.pattern is not None and not ckpt.meta.pattern.accelerated and sparse:
        result.notes.append(f"TensorRT accelerates only 2:4, not {ckpt.meta.pattern}: expect dense kernels")
    try:
        trt_module = import_tensorrt()
        major = tensorrt_major(trt_module)
    except BackendUnavailableError as exc:
        trt_module, major = None, 10
        result.trt_missing = str(exc)
    assert result.onnx is not None
    settings = builder_settings(
        trt_major=major,
        precision=result.precision,
        sparse=sparse,
        spec=job.spec,
        input_names=result.onnx.input_names,
        dynamic_axes=result.onnx.dynamic_axes,
        workspace_mb=workspace_mb,
        max_sequence=max_sequence_of(job.loaded.model),
    )
    result.settings = settings
    result.notes += list(settings.notes)
    result.trtexec = trtexec_command(onnx_path, engine_path, settings)
    if result.verify is not None and result.verify.passed is False:
        result.notes.append("the TensorRT engine was not built because verification failed")
    elif trt_module is not None:
        step("building the TensorRT engine")
        result.engine = build_engine(
            onnx_path,
            engine_path,
            settings,
            pruned_nodes={m.param: m.node for m in result.matches if not m.lost},
            force=force,
            inputs=[job.local_input],
        )


def trtexec_variants(command: str) -> Sequence[str]:
    """The trtexec line for TensorRT 8-10, and its TensorRT 11 form (strongly typed, no precision flags)."""
    parts = command.split(" ")
    strongly = [p for p in parts if p not in ("--fp16", "--bf16", "--int8", "--fp8")]
    if "--stronglyTyped" not in strongly:
        strongly.append("--stronglyTyped")
    return [command, " ".join(strongly)]


def _load_for_export(checkpoint: str, arch: str | None, trust: bool, model_class: str) -> LoadedModel:
    """:func:`nmcli.models.sources.load_model`; a checkpoint with no architecture to rebuild (pruned
    with ``--infer-layers``) is told both ways out: ``--arch``, or the plain weights with ``--format plain``.

    Raises:
        NoArchitectureError: see above.
    """
    from nmcli.models.sources import load_model

    try:
        return load_model(checkpoint, arch=arch, trust=trust, model_class=model_class)
    except NoArchitectureError as exc:
        if arch:
            raise
        if not classify(checkpoint).is_checkpoint:  # a bare state dict: only its architecture can run it
            raise NoArchitectureError(
                f"{checkpoint} is a plain state dict with no architecture: pass --arch SPEC "
                "(e.g. py:mypkg.models:build) to export it"
            ) from None
        raise NoArchitectureError(
            f"{exc}; to hand the weights to another tool without the model, write them with "
            f"nmcli export {checkpoint} --format plain"
        ) from None


def _held_out_count(total: int) -> int:
    """Examples kept back from calibration to compare the Q/DQ model with the float one on."""
    return 0 if total < 2 else max(1, min(64, total // 5))


def _export_quantized(
    kind: InputKind,
    out: Path,
    result: ExportResult,
    *,
    calib: str,
    samples: int,
    method: str,
    spec_override: InputSpec | None,
    dynamic_batch: bool,
    opset: int | None,
    exporter: str,
    force: bool,
    arch: str | None,
    trust: bool,
    model_class: str,
) -> _OnnxJob:
    """``--precision int8|fp8``: read and check the calibration data, export the float32 ONNX to a
    staging folder, and quantize it to ``out`` (Q/DQ, sparse weights checked, agreement measured).

    Raises:
        InputError, DataError: no input shape, or calibration data that does not fit the model
            (before anything is written).
    """
    import tempfile

    from nmcli.algorithms.config import CalibrationConfig
    from nmcli.export.onnx import precision_dtype
    from nmcli.export.quantize import quantize_onnx
    from nmcli.models.batchnorm import model_call_kwargs
    from nmcli.models.data import check_batch_fits
    from nmcli.models.sources import load_model
    from nmcli.pipelines.blocks import calibration_batches

    loaded = load_model(kind.spec, arch=arch, trust=trust, model_class=model_class)
    spec = spec_override or loaded.input_spec
    if spec is None:
        raise InputError(f"{kind.spec} stores no input shape: pass --input-shape, e.g. 1x3x224x224")
    source = loaded.source.arch or loaded.source.spec
    config = CalibrationConfig(spec=calib, samples=samples + _held_out_count(samples + samples // 4))
    batches = calibration_batches(config, source_spec=source, input_shape=spec.tensors[0].shape)
    check_batch_fits(loaded.model, batches[0], f"--calib {calib}", extra=model_call_kwargs(loaded.model))
    examples = graph_feeds(batches, spec, dynamic_batch=dynamic_batch, what=f"--calib {calib}")
    held = _held_out_count(len(examples))
    calibration, held_out = examples[: len(examples) - held], examples[len(examples) - held :]
    local_input = kind.path if kind.path is not None else Path(kind.spec)
    with tempfile.TemporaryDirectory(prefix=".nmcli-float-", dir=out.parent) as stage:
        floating = Path(stage) / out.name
        job = _export_onnx(
            kind, floating, result, dtype=precision_dtype("fp32"), spec_override=spec, dynamic_batch=dynamic_batch, opset=opset,
            exporter=exporter, force=True, verify=False, arch=arch, trust=trust, loaded=loaded,
        )  # fmt: skip
        ckpt = loaded.checkpoint
        patterns = {e.param: e.pattern for e in ckpt.meta.layers} if ckpt is not None else {}
        result.quantized = quantize_onnx(
            floating, out, calibration, held_out, precision=result.precision, method=method,
            pruned=result.matches, patterns=patterns, force=force, inputs=[local_input],
        )  # fmt: skip
    assert result.onnx is not None
    result.onnx.path, result.onnx.data_path = out, None
    quantized = {layer.param: layer for layer in result.quantized.layers if layer.initializer}
    result.matches = [  # where the pruned weights are now: the quantized initializers
        replace(m, initializer=quantized[m.param].initializer) if m.param in quantized else m for m in result.matches
    ]
    result.notes += result.quantized.notes
    check = result.quantized.check
    if check.skipped:
        result.warnings.append(f"the Q/DQ model was not compared with the float one: {check.skipped}")
    elif check.cosine is not None and check.cosine < MIN_QUANT_COSINE:
        result.warnings.append(
            f"the {result.precision} model agrees poorly with the float sparse model ({check.summary()}): "
            "try --calib-method percentile or more --calib-samples"
        )
    return _OnnxJob(job.loaded, job.spec, local_input)


MIN_QUANT_COSINE = 0.95  # below it the export warns: calibration is likely off


def graph_feeds(batches: Sequence[Any], spec: InputSpec, *, dynamic_batch: bool, what: str) -> list[dict[str, Any]]:
    """Calibration batches as onnxruntime feeds of the exported graph (inputs named as export names them).

    Without ``dynamic_batch`` the graph takes the spec's exact shapes, so batches are cut into the
    spec's batch size (a remainder is dropped).

    Raises:
        InputError: the data lacks an input the graph takes, or its shapes do not fit a fixed-shape graph.
    """
    import numpy as np

    names = [t.name or (f"input_{i}" if len(spec.tensors) > 1 else "input") for i, t in enumerate(spec.tensors)]
    feeds: list[dict[str, Any]] = []
    for batch in batches:
        arrays: dict[str, Any] = {}
        for i, (tensor, name) in enumerate(zip(spec.tensors, names, strict=True)):
            value = batch.kwargs.get(tensor.name) if tensor.name else None
            if value is None and i < len(batch.args):
                value = batch.args[i]
            if value is None:
                raise InputError(f"{what} has no {tensor.name or 'input'} tensor, which the model takes")
            arrays[name] = value.detach().cpu().numpy().astype(str(tensor.dtype).removeprefix("torch."))
        if dynamic_batch:  # one example per feed: onnxruntime's histogram calibrators stack them
            feeds += [{k: v[i : i + 1] for k, v in arrays.items()} for i in range(next(iter(arrays.values())).shape[0])]
            continue
        size = spec.batch_size
        arrays = {name: _to_fixed(arrays[name], tensor.shape) for tensor, name in zip(spec.tensors, names, strict=True)}
        for start in range(0, next(iter(arrays.values())).shape[0] - size + 1, size):
            part = {k: np.ascontiguousarray(v[start : start + size]) for k, v in arrays.items()}
            for tensor, name in zip(spec.tensors, names, strict=True):
                if tuple(part[name].shape) != tuple(tensor.shape):
                    raise InputError(
                        f"{what}: {name} has shape {'x'.join(map(str, part[name].shape[1:]))} per example but the "
                        f"model is exported for {tensor}: pass --dynamic-batch or an --input-shape that fits the data"
                    )
            feeds.append(part)
    if not feeds:
        raise InputError(f"{what} holds fewer examples than one batch of {spec.batch_size}: give more data")
    return _padded(feeds) if dynamic_batch else feeds


def _to_fixed(array: Any, shape: Sequence[int]) -> Any:
    """Integer inputs (token ids, attention masks) zero-padded or cut to a fixed-shape graph's
    sequence length: text batches come padded to their own longest line, and a zero attention mask
    leaves the padded positions out. Float inputs are left as they are (their shape must fit)."""
    import numpy as np

    if array.dtype.kind not in "iub" or array.ndim != len(shape) or tuple(array.shape[1:]) == tuple(shape[1:]):
        return array
    cut = array[(slice(None), *(slice(0, d) for d in shape[1:]))]
    return np.pad(cut, [(0, 0), *((0, d - c) for d, c in zip(shape[1:], cut.shape[1:], strict=True))])


def _padded(feeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Integer inputs (token ids, masks) zero-padded to one shape: text batches are padded to their own
    longest line, and onnxruntime's histogram calibrators stack every example of a tensor."""
    for name in feeds[0]:
        shapes = {f[name].shape for f in feeds}
        if len(shapes) == 1:
            continue
        target = tuple(max(dims) for dims in zip(*shapes, strict=True))
        for f in feeds:
            f[name] = _to_fixed(f[name], target)
    return feeds

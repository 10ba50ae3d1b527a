"""``nmcli prune``: the command logic behind the CLI."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from nmcli.algorithms.config import DEFAULT_REFIT_ITERATIONS, CalibrationConfig
from nmcli.device import resolve_device
from nmcli.errors import InputError
from nmcli.formats.checkpoint import Checkpoint, SourceRef, save_checkpoint
from nmcli.formats.open import Form, InputKind, classify
from nmcli.formats.safetensors import sha256_file
from nmcli.formats.sharded import check_output_directory
from nmcli.inputs import InputSpec, parse_input_spec
from nmcli.io import check_output_path
from nmcli.models.data import check_data_spec
from nmcli.models.hfclass import not_an_hf_source
from nmcli.models.inferred import infer_state_dict_layers, is_layer_weight
from nmcli.models.skeleton import build_skeleton
from nmcli.models.sources import (
    LoadedModel,
    default_output_path,
    guess_input_spec,
    load_model,
    normalize_spec,
    source_ref,
)
from nmcli.models.statenames import StoredNames
from nmcli.nm.pattern import Pattern, parse_pattern
from nmcli.pipelines.blocks import calibration_batches
from nmcli.pipelines.inmemory import PruneResult, check_method, prune_model, prune_state_dict
from nmcli.pipelines.streamed import prune_directory
from nmcli.progress import ProgressCallback


def calibration_config(
    spec: str | None,
    *,
    samples: int = 128,
    max_length: int = 128,
    damp: float = 0.01,
    block_size: int = 128,
    refit: bool = True,
    bn_recalibrate: bool = True,
    device: str = "cpu",
) -> CalibrationConfig | None:
    """The calibration of ``--calib SPEC`` and its options (``--device`` resolved); None without ``--calib``.

    Raises:
        BackendUnavailableError: ``--device cuda`` without CUDA (exit 3).
        InputError: ``--device`` is not a device name.
    """
    if spec is None:
        return None
    return CalibrationConfig(
        spec=spec,
        samples=samples,
        max_length=max_length,
        damp=damp,
        block_size=block_size,
        bn_recalibrate=bn_recalibrate,
        device=resolve_device(device),
        refit_iterations=DEFAULT_REFIT_ITERATIONS if refit else 0,
    )


def run_prune(
    model_spec: str,
    *,
    pattern: str | Pattern = "2:4",
    method: str = "magnitude",
    calibration: CalibrationConfig | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    arch: str | None = None,
    trust: bool = False,
    input_shape: str | None = None,
    keep_dense: bool = False,
    output: str | Path | None = None,
    force: bool = False,
    infer_layers: bool = False,
    progress: ProgressCallback | None = None,
    model_class: str = "auto",
) -> PruneResult:
    """``nmcli prune``: load ``model_spec``, prune it, and write the checkpoint atomically.

    ``model_class`` (``--model-class``) picks an ``hf:`` source's class (:mod:`nmcli.models.hfclass`).
    ``infer_layers`` prunes a bare state dict (``.pt``/``.pth``/``.safetensors``) without ``--arch``:
    its layers are inferred from the tensors (:func:`nmcli.models.inferred.infer_layers`), magnitude only,
    and the checkpoint records that; commands that must run the model then need ``--arch``.

    Options are validated and the output path checked before the model is loaded, so bad input
    fails fast and no partial file is ever left. ``calibration`` (``--calib`` and its options)
    is required by ``wanda`` and ``sparsegpt``; with ``magnitude`` it only serves the BatchNorm
    re-estimation and the per-layer reconstruction errors.
    """
    nm = parse_pattern(pattern)
    check_method(method, calibration is not None)
    if calibration is not None:
        calibration.validate()
        check_data_spec(calibration.spec, "--calib")
    spec_input = parse_input_spec(input_shape) if input_shape else None
    kind = classify(model_spec)
    if _streamed(kind, output):
        return _run_prune_directory(
            kind, nm, method=method, calibration=calibration, include=include, exclude=exclude,
            input_spec=spec_input, keep_dense=keep_dense, output=output, force=force, progress=progress,
            model_class=model_class,
        )  # fmt: skip
    out = Path(output) if output else default_output_path(model_spec, nm.slug)
    local_input = kind.path if kind.path is not None else Path(model_spec)
    if infer_layers:
        if arch:
            raise InputError("--infer-layers and --arch exclude each other: --arch gives the real layers")
        if method != "magnitude" or calibration is not None:
            raise InputError(f"--infer-layers prunes by magnitude only: {method} with --calib needs the model (--arch)")
        if model_class != "auto":
            raise not_an_hf_source(model_spec, model_class)
    check_output_path(out, force=force, inputs=[local_input])
    if infer_layers:
        return _prune_inferred(kind, nm, out, include, exclude, keep_dense, trust, force, progress)
    loaded = _load_reporting(model_spec, arch, trust, progress, model_class)
    input_spec = spec_input or loaded.input_spec
    batches = None
    if calibration is not None:
        source = loaded.source.arch or loaded.source.spec
        shape = input_spec.tensors[0].shape if input_spec is not None else None
        batches = calibration_batches(calibration, source_spec=source, input_shape=shape, by_length=True)
    result = prune_model(
        loaded.model,
        nm,
        source=loaded.source,
        method=method,
        calibration=calibration,
        batches=batches,
        include=include,
        exclude=exclude,
        keep_dense=keep_dense,
        input_spec=input_spec,
        start=_start_of(loaded),
        inplace=True,  # the model was loaded here and is not used again
        history_args=_history_args(
            model_spec, nm, method, include, exclude, keep_dense, model_class, calibration, arch
        ),
        progress=progress,
    )
    if not result.checkpoint.masks:
        raise InputError(
            f"no layer of {model_spec} can be pruned to {nm}: "
            + ("; ".join(sorted({r.reason for r in result.layers})) or "it has no Linear, Conv or attention layers")
        )
    save_checkpoint(result.checkpoint, out, force=force, inputs=[local_input])
    result.output = out
    return result


def _start_of(loaded: LoadedModel) -> Checkpoint | None:
    """The checkpoint the model was read from, its dense weights under the model's names (a base model
    rebuilt from files saved with a head stores them under ``bert.*``: :mod:`nmcli.models.statenames`)."""
    ckpt = loaded.checkpoint
    if ckpt is None or not ckpt.dense:
        return ckpt
    return replace(ckpt, dense=StoredNames.of(loaded.model, ckpt.tensors).model_state(ckpt.dense))


def _streamed(kind: InputKind, output: str | Path | None) -> bool:
    """Whether the input is pruned from its shards without loading it (:mod:`nmcli.pipelines.streamed`).

    A plain HF directory with sharded safetensors (``hf:DIR`` or a bare ``DIR``) always is; one with a
    single ``model.safetensors`` is when given as a bare ``DIR`` or with an ``-o`` that is not a
    ``.safetensors`` file (``hf:DIR`` alone keeps writing one nmcli/1 file). Its output is a directory.
    """
    if not kind.is_streamable:
        return False
    if output is not None and str(output).endswith(".safetensors"):
        return False  # loaded whole by transformers, written as one nmcli/1 file
    if kind.form is Form.HF_SHARDED or not kind.prefix:
        return True
    return output is not None


def _run_prune_directory(
    kind: InputKind,
    nm: Pattern,
    *,
    method: str,
    calibration: CalibrationConfig | None,
    include: Sequence[str],
    exclude: Sequence[str],
    input_spec: InputSpec | None,
    keep_dense: bool,
    output: str | Path | None,
    force: bool,
    progress: ProgressCallback | None,
    model_class: str = "auto",
) -> PruneResult:
    """``run_prune`` of an HF directory: tensor by tensor (magnitude) or block by block, into a sharded checkpoint."""
    model_spec, folder = kind.spec, kind.path
    assert folder is not None
    out = Path(output) if output else default_output_path(model_spec, nm.slug, suffix="")
    if str(out).endswith(".safetensors"):
        raise InputError(
            f"{model_spec} is a sharded model and is written as a directory: give -o a directory name, not {out}"
        )
    check_output_directory(out, force=force, inputs=[folder])
    spec = model_spec if kind.prefix else f"hf:{model_spec}"
    source = source_ref(spec, model_class=model_class)
    skeleton = build_skeleton(folder, model_class)
    if input_spec is None:
        input_spec = guess_input_spec(skeleton)
    batches = None
    if calibration is not None:
        shape = input_spec.tensors[0].shape if input_spec is not None else None
        batches = calibration_batches(calibration, source_spec=source.spec, input_shape=shape, by_length=True)
    return prune_directory(
        model_spec,
        folder,
        out,
        nm,
        source=source,
        method=method,
        calibration=calibration,
        batches=batches,
        include=include,
        exclude=exclude,
        keep_dense=keep_dense,
        input_spec=str(input_spec) if input_spec else None,
        skeleton=skeleton,
        history_args=_history_args(model_spec, nm, method, include, exclude, keep_dense, model_class, calibration),
        force=force,
        progress=progress,
    )


def _history_args(
    model_spec: str, nm: Pattern, method: str, include: Sequence[str], exclude: Sequence[str], keep_dense: bool,
    model_class: str, calibration: CalibrationConfig | None, arch: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The options a prune records in the checkpoint's history."""
    args: dict[str, Any] = {
        "model": model_spec, "pattern": str(nm), "method": method, "include": list(include), "exclude": list(exclude),
        "arch": arch, "keep_dense": keep_dense,
    }  # fmt: skip
    if model_class != "auto":
        args["model_class"] = model_class
    return {**args, **(_calibration_args(calibration) if calibration is not None else {})}


def _calibration_args(cfg: CalibrationConfig) -> dict[str, Any]:
    return {
        "calib": cfg.spec,
        "calib_samples": cfg.samples,
        "max_length": cfg.max_length,
        "damp": cfg.damp,
        "block_size": cfg.block_size,
        "bn_recalibrate": cfg.bn_recalibrate,
    }


def _prune_inferred(
    kind: InputKind,
    pattern: Pattern,
    out: Path,
    include: Sequence[str],
    exclude: Sequence[str],
    keep_dense: bool,
    trust: bool,
    force: bool,
    progress: ProgressCallback | None,
) -> PruneResult:
    spec, path = kind.spec, kind.path
    if kind.prefix or path is None or not kind.is_file:
        raise InputError(f"--infer-layers needs a state-dict file (.pt, .pth, .bin, .safetensors); {spec} is not one")
    _loading(spec, progress)
    found = infer_state_dict_layers(path, pattern=pattern, trust=trust, include=list(include), exclude=list(exclude))
    result = prune_state_dict(
        dict(found.state.tensors),
        found.candidates,
        pattern,
        source=SourceRef(spec=normalize_spec(spec), sha256=sha256_file(path)),
        keep_dense=keep_dense,
        notes=found.notes,
        history_args={
            "model": spec,
            "pattern": str(pattern),
            "method": "magnitude",
            "infer_layers": True,
            "include": list(include),
            "exclude": list(exclude),
            "keep_dense": keep_dense,
        },
        progress=progress,
    )
    result.layers = [layer for layer in result.layers if is_layer_weight(layer.param, layer.shape)]  # no biases
    if not result.checkpoint.masks:
        raise InputError(f"no tensor of {spec} was inferred to be a prunable layer for {pattern}: pass --arch SPEC")
    save_checkpoint(result.checkpoint, out, force=force, inputs=[spec])
    result.output = out
    return result


def _loading(spec: str, progress: ProgressCallback | None) -> None:
    """Say what is loading (total 0: the bar shows a spinner and the label, not ``0/?``)."""
    if progress is not None:
        progress(0, 0, f"loading {spec}")


def _load_reporting(
    spec: str, arch: str | None, trust: bool, progress: ProgressCallback | None, model_class: str = "auto"
) -> LoadedModel:
    """:func:`nmcli.models.sources.load_model`, reported to ``progress`` as it starts."""
    _loading(spec, progress)
    return load_model(spec, arch=arch, trust=trust, model_class=model_class)

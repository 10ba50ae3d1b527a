"""ONNX export of a (pruned) model, keeping its N:M weights visible as plain initializers.

Exporter choice. torch ships two ONNX exporters: the TorchScript tracer (``dynamo=False``) and
the dynamo exporter (``torch.export`` + onnxscript, the default since torch 2.9). For float32
(and int8, whose ONNX is float32) nmcli uses the TorchScript exporter first, deliberately, and
falls back to dynamo only when tracing fails:

* both keep weights as plain initializers that :func:`nmcli.formats.onnx_layout.locate_weights` finds by
  value, for the CNN, MLP, MiniLM (BERT) and GPT-2 models the tests export, but the dynamo
  exporter's graph optimizer also adds initializers (folded shapes, constants), needs opset 18
  or newer (GPT-2 fails at opset 17 with ``Split(num_outputs)``) and prints its progress on
  stdout, which ``--json`` must keep clean;
* on the 2 CPU cores nmcli is tested on it is 4-30x slower (MiniLM: 1.5 s vs 6.7 s, tiny GPT-2:
  0.15 s vs 4.4 s with torch 2.13);
* ``dynamic_axes`` give named dynamic batch/sequence dimensions that TensorRT profiles and
  ``trtexec --minShapes`` refer to directly.

For fp16/bf16 the order is reversed: with torch 2.13 the TorchScript exporter writes an invalid
graph for fp16 transformers (``LayerNormalization`` bound to float and float16) and fails on bf16
ones, while the dynamo exporter handles both (onnxruntime's CPU provider has no bf16 ``Add``, so a
bf16 file is written but its verification is skipped, not failed).

The model is wrapped so it takes its inputs positionally in input-spec order (named, for
transformers: ``input_ids``, ``attention_mask``) and returns a tuple of tensors (a transformers
``ModelOutput`` becomes its top-level tensors, e.g. ``last_hidden_state``, ``logits``). With
``--precision fp16|bf16`` the weights are cast (pruned zeros stay exact ``+0.0``) and the graph
casts its float inputs and outputs, so callers feed float32 either way. Files over 2 GB are saved
with their tensors in ``<name>.onnx.data`` beside the ``.onnx`` (ONNX's external data).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmcli.errors import ExportUnsupportedError, InputError, NmcliError
from nmcli.formats.onnx_layout import (
    WeightMatch,
    clear_negative_zeros,
    locate_weights,
    set_input_spec,
    set_sparse_layers,
    share_tied_tables,
)
from nmcli.inputs import FLOAT_PRECISIONS, InputSpec, example_inputs
from nmcli.io import atomic_output, output_write_error, write_errno_in, writing
from nmcli.models.sources import copy_model, eval_mode, fixed_graph_kind
from nmcli.nm.pattern import Pattern

DEFAULT_OPSET = 17
DYNAMO_MIN_OPSET = 18
EXTERNAL_DATA_THRESHOLD = 2_000_000_000  # protobuf's hard limit is 2 GiB; keep a margin
PRECISIONS: dict[str, torch.dtype] = {
    **FLOAT_PRECISIONS,
    "int8": torch.float32,  # int8/fp8: the float32 ONNX is quantized to Q/DQ (nmcli.export.quantize)
    "fp8": torch.float32,
}


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype the ONNX weights take for ``precision``.

    Raises:
        InputError: unknown precision.
    """
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise InputError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}") from None


def _tensors_of(out: Any) -> list[tuple[str, torch.Tensor]]:
    """Top-level tensors of a model output, with names (ModelOutput keys; else output, output_1, ...)."""
    if isinstance(out, torch.Tensor):
        return [("output", out)]
    if isinstance(out, Mapping):  # transformers ModelOutput is an OrderedDict
        return [(str(k), v) for k, v in out.items() if isinstance(v, torch.Tensor)]
    if isinstance(out, (tuple, list)):
        found = [v for v in out if isinstance(v, torch.Tensor)]
        return [("output" if i == 0 else f"output_{i}", v) for i, v in enumerate(found)]
    raise InputError(f"the model returns a {type(out).__name__}, not tensors: it cannot be exported to ONNX")


def _forward_parameters(model: nn.Module) -> set[str]:
    """The parameter names of ``model.forward`` (a TorchScript method's from its schema)."""
    forward = getattr(model, "forward", None)
    if forward is None:
        return set()
    schema = getattr(forward, "schema", None)  # torch.ScriptMethod: no Python signature
    if schema is not None:
        return {argument.name for argument in schema.arguments}
    try:
        return set(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return set()


class TensorModel(nn.Module):
    """Wraps a model: positional inputs in spec order, float32 I/O, a tuple of tensors out.

    Args:
        model: the model (its floating parameters may be fp16/bf16).
        names: the input names for keyword calls (transformers), or None for positional calls.
        dtype: the model's compute dtype; float inputs are cast to it and float outputs back to float32.
    """

    def __init__(self, model: nn.Module, names: Sequence[str] | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.names = list(names) if names else None
        self.dtype = dtype
        self.extra: dict[str, Any] = {"use_cache": False} if "use_cache" in _forward_parameters(model) else {}

    def train(self, mode: bool = True) -> TensorModel:
        """Set the training flag; a ``torch.export`` module (which refuses ``train``/``eval``) keeps its own.

        Its graph was fixed when it was exported, so the flag changes nothing it computes.
        """
        self.training = mode
        try:
            self.model.train(mode)
        except NotImplementedError:
            pass
        return self

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cast = [x.to(self.dtype) if x.is_floating_point() else x for x in inputs]
        out = self.model(**dict(zip(self.names, cast, strict=True)), **self.extra) if self.names else self.model(*cast)
        return tuple(v.float() if v.is_floating_point() else v for _, v in _tensors_of(out))

    def output_names(self, *inputs: torch.Tensor) -> list[str]:
        cast = [x.to(self.dtype) if x.is_floating_point() else x for x in inputs]
        with torch.no_grad():
            out = (
                self.model(**dict(zip(self.names, cast, strict=True)), **self.extra)
                if self.names
                else self.model(*cast)
            )
        return [name for name, _ in _tensors_of(out)]


def text_inputs(spec: InputSpec) -> bool:
    """Whether the spec looks like a text model's (integer ``[batch, sequence]`` inputs)."""
    return bool(spec.tensors) and all(not t.dtype.is_floating_point and len(t.shape) == 2 for t in spec.tensors)


def vocab_size_of(model: nn.Module) -> int | None:
    """The token vocabulary of a transformers model (for random token ids), else None."""
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    return int(size) if isinstance(size, int) and size > 0 else None


def max_sequence_of(model: nn.Module) -> int | None:
    """The longest sequence a transformers model accepts (position embeddings), else None."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_spec_fits(model: nn.Module, spec: InputSpec) -> None:
    """Refuse sequence lengths beyond the model's position embeddings, with the fix.

    Raises:
        InputError: a ``[batch, sequence]`` input is longer than the model accepts.
    """
    limit = max_sequence_of(model)
    if limit is None or not text_inputs(spec):
        return
    longest = max(t.shape[1] for t in spec.tensors)
    if longest > limit:
        fixed = ",".join(f"{t.name}:{t.shape[0]}x{limit}:int64" for t in spec.tensors)
        raise InputError(
            f"the input spec {spec} is longer than the model's {limit} positions: pass --input-shape {fixed}"
        )


@dataclass
class OnnxExport:
    """An exported ONNX file.

    Attributes:
        path: the ``.onnx`` file.
        data_path: its external-data file, when the model is over 2 GB.
        exporter: ``torchscript`` or ``dynamo``.
        opset: the ONNX opset.
        input_names: graph inputs, in spec order.
        output_names: graph outputs.
        dynamic_axes: ``{input: {axis: name}}`` of the dynamic dimensions.
        precision: the weights' precision (``fp32``, ``fp16``, ``bf16``).
        notes: things the user should know (exporter fallback, opset raised).
    """

    path: Path
    data_path: Path | None
    exporter: str
    opset: int
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    precision: str
    notes: list[str] = field(default_factory=list)
    matches: list[WeightMatch] = field(default_factory=list)


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` with floating parameters and buffers in ``dtype``; zeros become exact ``+0.0``.

    Casting can underflow tiny values to ``-0.0``, which sparse compressors count as non-zero.
    """
    if dtype == torch.float32:
        return model
    out = copy_model(model).to(dtype)
    with torch.no_grad():
        for tensor in [*out.parameters(), *out.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.where(tensor == 0, torch.zeros((), dtype=tensor.dtype), tensor))
    return out


def _dynamic_axes(
    spec: InputSpec, names: list[str], outputs: list[str], sample: Sequence[torch.Tensor], dynamic_batch: bool
) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    if not dynamic_batch:
        return axes
    text = text_inputs(spec)
    seq = spec.tensors[0].shape[1] if text else None
    for name in names:
        axes[name] = {0: "batch", 1: "sequence"} if text else {0: "batch"}
    for name, value in zip(outputs, sample, strict=True):
        dims = {0: "batch"} if value.dim() else {}
        if text and value.dim() >= 2 and value.shape[1] == seq:
            dims[1] = "sequence"
        if dims:
            axes[name] = dims
    return axes


def _torchscript_export(traced: _Traced, path: Path, opset: int) -> None:
    wrapper = traced.wrapper
    if fixed_graph_kind(wrapper) == "TorchScript":
        # The TorchScript exporter refuses a Python module that calls a loaded ScriptModule ("not
        # part of the active trace"), but exports a ScriptModule: trace the wrapper into one first
        # (the wrapped TorchScript code is kept as scripted, its shapes stay symbolic).
        wrapper = torch.jit.trace(wrapper, traced.args, check_trace=False)
    torch.onnx.export(
        wrapper,
        traced.args,
        str(path),
        dynamo=False,
        input_names=traced.names,
        output_names=traced.outputs,
        dynamic_axes=traced.axes or None,
        opset_version=opset,
        do_constant_folding=True,
    )


def _dynamo_export(traced: _Traced, path: Path, opset: int) -> None:
    from torch.export import Dim

    shapes = None
    if traced.axes:
        dims = {"batch": Dim("batch", min=1, max=4096), "sequence": Dim("sequence", min=2, max=65536)}
        axes = traced.axes
        shapes = (tuple({int(a): dims[n] for a, n in axes.get(name, {}).items()} or None for name in traced.names),)
    torch.onnx.export(
        traced.wrapper,
        traced.args,
        str(path),
        dynamo=True,
        input_names=traced.names,
        output_names=traced.outputs,
        dynamic_shapes=shapes,
        opset_version=opset,
        external_data=False,
    )


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """Silence torch.onnx's logging (the dynamo exporter logs missing torchvision ops) for one export."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _captured_stdout(captured: list[str]) -> Iterator[None]:
    """Capture everything written to stdout during one export, by Python or by native code.

    The TorchScript exporter's C++ side prints a "Torch IR graph at exception" dump (about 200 KB
    for a tiny Mixtral) on file descriptor 1 when it fails, and the dynamo exporter prints its
    progress: none of it may reach stdout, which ``--json`` keeps for its one JSON object. The
    text is appended to ``captured``; :func:`export_onnx` attaches it to its error when every exporter
    failed (``exporter_output`` of the error; ``nmcli export`` shows it on stderr).
    """
    sys.stdout.flush()
    buffer = io.StringIO()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (embedded interpreters): Python-level capture only
        with contextlib.redirect_stdout(buffer):
            yield
        captured.append(buffer.getvalue())
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            with contextlib.redirect_stdout(buffer):
                yield
        finally:
            _flush_c_stdio()
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            captured.append(buffer.getvalue() + sink.read().decode("utf-8", "replace"))


def _flush_c_stdio() -> None:
    import ctypes

    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to flush (Windows without a CRT handle)
        pass


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    first = text.splitlines()[0].strip() if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def model_error_line(exc: BaseException) -> str:
    """An error the model raised when run, in one line: a TorchScript interpreter error's last line
    (the message; the lines before it are TorchScript's traceback), else its first line."""
    text = _ANSI.sub("", str(exc)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if "Traceback of TorchScript" in text:
        return lines[-1]
    return f"{type(exc).__name__}: {lines[0]}"


def exporter_error_line(exc: BaseException) -> str:
    """An exporter's error in one line without ANSI colour codes: its first line, and its root cause's.

    The dynamo exporter wraps the useful message (``No ONNX function found for aten._linalg_eigh``)
    in generic ones (``Failed to convert the exported program ...``).
    """
    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    line = _first_line(exc)
    return line if root is exc else f"{line} ... {_first_line(root)}"


# --- MoE experts for export ------------------------------------------------------------------
# transformers 5 runs MoE experts through a dispatchable implementation (``grouped_mm`` by
# default), which neither exporter can trace (TorchScript: ``aten::histc``; dynamo: the grouped
# GEMM). Its ``eager`` loop traces, but only over the experts the example input happened to hit
# (``for expert_idx in expert_hit``): the graph then fails in onnxruntime (a Split of the wrong
# size) on any input that hits fewer experts. For export nmcli installs a static loop over every
# expert (tokens gathered with ``torch.where``: an empty expert is a zero-row MatMul), exact for
# any input, and restores the model's own implementation afterwards. Each ``W[e]`` is constant-
# folded into its own initializer, where TensorRT sees a plain 2:4 weight.

EXPORT_EXPERTS = "nmcli_export"


def _expert_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else nn.functional.linear(x, weight)
    return out + bias if bias is not None else out


def static_experts_forward(
    self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Every expert in turn on the tokens routed to it: the same result as transformers' implementations."""
    has_gate = bool(getattr(self, "has_gate", True))
    has_bias = bool(getattr(self, "has_bias", False))
    transposed = bool(getattr(self, "is_transposed", False))
    up = self.gate_up_proj if has_gate else self.up_proj
    up_bias = (self.gate_up_proj_bias if has_gate else self.up_proj_bias) if has_bias else None
    down_bias = self.down_proj_bias if has_bias else None
    # Accumulated in float32: onnxruntime's CPU ScatterND has no float16 "add" reduction.
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    for e in range(int(self.num_experts)):
        tokens, slot = torch.where(top_k_index == e)
        h = _expert_linear(hidden_states[tokens], up[e], up_bias[e] if up_bias is not None else None, transposed)
        h = self._apply_gate(h) if has_gate else self.act_fn(h)
        h = _expert_linear(h, self.down_proj[e], down_bias[e] if down_bias is not None else None, transposed)
        if getattr(self, "has_post_expert_norm", False):
            h = self.post_expert_norm(h)
        out.index_add_(0, tokens, (h * top_k_weights[tokens, slot, None]).to(out.dtype))
    return out.to(hidden_states.dtype)


@contextlib.contextmanager
def exportable_experts(model: nn.Module) -> Iterator[bool]:
    """Switch a transformers MoE model to :func:`static_experts_forward` for export, then restore it.

    Yields whether it switched (False for models without dispatchable experts).
    """
    getter = getattr(model, "get_experts_implementation", None)
    setter = getattr(model, "set_experts_implementation", None)
    dispatched = any(hasattr(m, "is_transposed") and hasattr(m, "num_experts") for m in model.modules())
    if getter is None or setter is None or not dispatched:
        yield False
        return
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    previous = getter()
    ALL_EXPERTS_FUNCTIONS[EXPORT_EXPERTS] = static_experts_forward
    try:
        setter(EXPORT_EXPERTS)
        yield True
    finally:
        setter(previous)
        del ALL_EXPERTS_FUNCTIONS[EXPORT_EXPERTS]


def _total_bytes(proto: Any) -> int:
    return sum(len(init.raw_data) for init in proto.graph.initializer)


def export_onnx(
    model: nn.Module,
    spec: InputSpec,
    path: str | os.PathLike[str],
    *,
    precision: str = "fp32",
    dynamic_batch: bool = False,
    opset: int | None = None,
    exporter: str = "auto",
    force: bool = False,
    inputs: Sequence[str | os.PathLike[str]] = (),
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    pruned: Mapping[str, tuple[torch.Tensor, Pattern]] | None = None,
    also_runs_on: Sequence[InputSpec] = (),
) -> OnnxExport:
    """Export ``model`` (effective weights) to ``path`` atomically.

    Args:
        model: the float32 model in eval mode.
        spec: its inputs; named inputs become named graph inputs.
        path: the ``.onnx`` output.
        precision: ``fp32``, ``fp16``, ``bf16`` (weights cast, zeros exact) or ``int8`` (float32 ONNX).
        dynamic_batch: make dimension 0 dynamic (and dimension 1 for text models).
        opset: the ONNX opset (default 17; the dynamo exporter needs 18+).
        exporter: ``auto`` (TorchScript, then dynamo if tracing fails), ``torchscript`` or ``dynamo``.
        force: overwrite an existing output.
        inputs: input files that must not be overwritten.
        external_data_threshold: total initializer bytes above which tensors go to ``<path>.data``.
        pruned: torch parameter name -> (effective weight in the export's dtype, pattern): located
            in the graph (:attr:`OnnxExport.matches`) and recorded in the file's ``metadata_props``
            (:func:`nmcli.formats.onnx_layout.set_sparse_layers`), so ``inspect`` checks exactly those.
        also_runs_on: other input specs the model must run on (the second shape a dynamic-batch
            export is verified with), checked before anything is written: a ``torch.export``
            program exported without dynamic shapes runs on its example shape only.

    Raises:
        InputError: a bad option, or a model that does not run on the spec's inputs.
        ExportUnsupportedError: the model runs in torch but neither exporter can export it (exit 3).
        OutputExistsError: the output exists without ``force``.
    """
    import onnx

    dtype = precision_dtype(precision)
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise InputError(f"unknown exporter {exporter!r}: use auto, torchscript or dynamo")
    if opset is not None and not 9 <= opset <= 23:
        raise InputError(f"--opset {opset} is out of range: use 13-20 (default {DEFAULT_OPSET})")
    out = Path(path)
    check_spec_fits(model, spec)
    notes: list[str] = []
    traced = _trace(model, spec, dtype, dynamic_batch, also_runs_on)
    order = _exporter_order(exporter, traced.exported, dtype)
    with (
        writing(out),
        tempfile.TemporaryDirectory(prefix=".nmcli-export-", dir=out.parent if out.parent.exists() else None) as stage,
    ):
        staged = Path(stage) / out.name
        used, used_opset, errors = _run_exporters(traced, order, staged, out, opset or DEFAULT_OPSET)
        if errors:
            notes.append(f"the {order[0]} exporter failed ({errors[0]}); exported with the {used} exporter")
        if used == "dynamo" and opset is not None and opset < DYNAMO_MIN_OPSET:
            notes.append(f"opset raised from {opset} to {DYNAMO_MIN_OPSET}: the dynamo exporter needs it")
        proto = onnx.load(str(staged), load_external_data=True)
        matches = _finish_graph(proto, spec, pruned, notes)
        data_path: Path | None = None
        if _total_bytes(proto) > external_data_threshold:
            data_path = _save_with_external_data(proto, out, Path(stage), force=force, inputs=inputs)
        else:
            with atomic_output(out, force=force, inputs=inputs) as tmp:
                onnx.save_model(proto, str(tmp))
    return OnnxExport(
        out, data_path, used, used_opset, traced.names, traced.outputs, traced.axes, precision, notes, matches
    )


@dataclass
class _Traced:
    """The model ready to export: wrapped to take and return tensors, with example inputs and graph names."""

    exported: nn.Module
    wrapper: TensorModel
    args: tuple[torch.Tensor, ...]
    names: list[str]
    outputs: list[str]
    axes: dict[str, dict[int, str]]


def _trace(
    model: nn.Module, spec: InputSpec, dtype: torch.dtype, dynamic_batch: bool, also_runs_on: Sequence[InputSpec]
) -> _Traced:
    """Cast and wrap ``model``, run it on ``spec``'s example inputs (and ``also_runs_on``), and name its graph.

    Raises:
        InputError: the model does not run on the spec's inputs, or not on one of ``also_runs_on``.
    """
    exported = eval_mode(cast_model(model, dtype))  # a torch.export module refuses eval(): kept as exported
    names = [t.name or (f"input_{i}" if len(spec.tensors) > 1 else "input") for i, t in enumerate(spec.tensors)]
    wrapper = TensorModel(exported, [t.name for t in spec.tensors] if spec.named else None, dtype).eval()
    args_, kwargs = example_inputs(spec, vocab_size=vocab_size_of(model) or 1000)
    args = tuple(args_) + tuple(kwargs[t.name] for t in spec.tensors if t.name)
    try:
        outputs = wrapper.output_names(*args)
        with torch.no_grad():
            sample = wrapper(*args)
    except NmcliError:
        raise
    except Exception as exc:
        raise InputError(
            f"the model does not run on inputs {spec} ({model_error_line(exc)}): pass the right --input-shape"
        ) from exc
    for other in also_runs_on:
        other_args, other_kwargs = example_inputs(other, vocab_size=vocab_size_of(model) or 1000)
        try:
            with torch.no_grad():
                wrapper(*other_args, *(other_kwargs[t.name] for t in other.tensors if t.name))
        except Exception as exc:
            raise InputError(
                f"the model runs on inputs {spec} but not on {other} ({model_error_line(exc)}): its batch size is "
                "fixed (a torch.export program exported without dynamic shapes takes only its example shape), so "
                "--dynamic-batch cannot be verified: drop --dynamic-batch"
            ) from exc
    outputs = [n if n not in names else f"{n}_out" for n in outputs]
    axes = _dynamic_axes(spec, names, outputs, sample, dynamic_batch)
    return _Traced(exported, wrapper, args, names, outputs, axes)


def _exporter_order(exporter: str, exported: nn.Module, dtype: torch.dtype) -> list[str]:
    """The exporters to try, in order (see the module docstring)."""
    if exporter != "auto":
        return [exporter]
    if fixed_graph_kind(exported) == "TorchScript":  # torch.export (the dynamo exporter) refuses ScriptModules
        return ["torchscript"]
    if dtype == torch.float32:
        return ["torchscript", "dynamo"]
    return ["dynamo", "torchscript"]  # the TorchScript exporter mistypes fp16 LayerNormalization and fails on bf16


def _run_exporters(
    traced: _Traced, order: Sequence[str], staged: Path, out: Path, opset: int
) -> tuple[str, int, list[str]]:
    """Export to ``staged`` with the first exporter of ``order`` that succeeds.

    Returns:
        The exporter used, its opset, and the failures of the exporters tried before it.

    Raises:
        OutputWriteError: the disk failed (named as ``out``): no other exporter can do better.
        ExportUnsupportedError: every exporter failed; it carries their captured output.
    """
    errors: list[str] = []
    captured: list[str] = []
    for name in order:
        use_opset = DYNAMO_MIN_OPSET if name == "dynamo" and opset < DYNAMO_MIN_OPSET else opset
        run = _torchscript_export if name == "torchscript" else _dynamo_export
        try:
            # Both exporters warn, the dynamo one prints progress and TorchScript's C++ side
            # dumps its graph on failure: all of it is captured, never on stdout.
            with warnings.catch_warnings(), _captured_stdout(captured):
                warnings.simplefilter("ignore")
                with _quiet_logs(), exportable_experts(traced.exported), torch.no_grad():
                    run(traced, staged, use_opset)
        except Exception as exc:  # any exporter failure: try the next one, report all (not the disk)
            code = write_errno_in(exc, staged)
            if code is not None:  # the disk, not the exporter: no other exporter can do better
                raise output_write_error(out, code) from exc
            errors.append(f"{name}: {exporter_error_line(exc)}")
            continue
        return name, use_opset, errors
    error = ExportUnsupportedError(
        f"torch cannot export this model to ONNX, although it runs in torch ({'; '.join(errors)}): "
        "try another torch or transformers version, or --opset"
    )
    error.exporter_output = "".join(captured)
    raise error


def _finish_graph(
    proto: Any, spec: InputSpec, pruned: Mapping[str, tuple[torch.Tensor, Pattern]] | None, notes: list[str]
) -> list[WeightMatch]:
    """Fix ``proto`` in place (exact zeros, tied tables), record the input spec and the pruned layers.

    Returns:
        Where each pruned parameter sits in the graph; what was changed is added to ``notes``.
    """
    fixed = clear_negative_zeros(proto)
    if fixed:
        notes.append(
            f"rewrote {sum(fixed.values()):,} -0.0 weight value(s) as +0.0 in {len(fixed)} initializer(s) "
            "(folding a negative BatchNorm scale into pruned weights turns +0.0 into -0.0)"
        )
    set_input_spec(proto, str(spec))
    tied = share_tied_tables(proto)
    if tied:
        notes.append(f"kept one copy of the tied embedding table(s) {', '.join(sorted(set(tied.values())))}")
    matches = locate_weights(proto, dict(pruned)) if pruned else []
    if matches and pruned:
        set_sparse_layers(proto, matches, {param: pattern for param, (_, pattern) in pruned.items()})
    return matches


def _save_with_external_data(
    proto: Any, out: Path, stage: Path, *, force: bool, inputs: Sequence[str | os.PathLike[str]]
) -> Path:
    """Write ``proto`` to ``out`` with its tensors in ``<out>.data`` (both atomically, staged in ``stage``)."""
    import onnx

    data_path = out.with_name(out.name + ".data")
    with atomic_output(out, force=force, inputs=inputs) as tmp_onnx:
        with atomic_output(data_path, force=force, inputs=inputs) as tmp_data:
            final = stage / "final"
            final.mkdir()
            onnx.save_model(
                proto,
                str(final / out.name),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_path.name,
                size_threshold=1024,
            )
            os.replace(final / data_path.name, tmp_data)
        os.replace(final / out.name, tmp_onnx)
    return data_path

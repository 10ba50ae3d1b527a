"""The onnxruntime backend of ``nmcli bench``: an ``.onnx`` file as given, and ``--vs`` a second one.

onnxruntime's CPU and CUDA execution providers have no 2:4 sparse kernels: a sparse ONNX file
runs dense kernels, and the output says so. Timing is wall time around ``session.run`` (which
returns host arrays, so on the CUDA provider it includes the copies of inputs and outputs).
Each file is labelled ``sparse`` or ``dense`` from its weights (a Conv/Gemm/MatMul weight that is
2:4 along its reduction axis and at least half zeros makes a file sparse).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nmcli.bench.types import BenchPlan, PlanRequest, Variant, spec_from_signature
from nmcli.device import parse_device
from nmcli.errors import BackendUnavailableError, InputError
from nmcli.formats.onnx_layout import (
    find_weights,
    initializer_tensor,
    load_onnx,
    stored_input_spec,  # the spec nmcli export recorded in metadata_props
    stored_quantization,
    weight_compliance,
)
from nmcli.inputs import InputSpec, example_inputs
from nmcli.member import check_onnx_external_data
from nmcli.nm.pattern import TENSOR_CORE_PATTERN

_ORT_TYPES: dict[str, torch.dtype] = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(bool)": torch.bool,
}
INSTALL_HINT = "pip install onnxruntime (or onnxruntime-gpu for the CUDA execution provider)"


def is_available() -> bool:
    """Whether the onnxruntime package can be imported."""
    return importlib.util.find_spec("onnxruntime") is not None


def _ort() -> Any:
    if not is_available():
        raise BackendUnavailableError(f"the onnxruntime backend needs the onnxruntime package: {INSTALL_HINT}")
    import onnxruntime

    return onnxruntime


def providers_for(device: str) -> list[Any]:
    """The execution providers for ``device`` (``cpu``, ``cuda`` or ``cuda:N``; N is the CUDA provider's ``device_id``).

    Raises:
        BackendUnavailableError: ``cuda`` asked for and onnxruntime has no CUDA execution provider.
    """

    ort = _ort()
    available = ort.get_available_providers()
    kind, index = parse_device(device)
    if kind == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailableError(
                f"--device {device} needs onnxruntime's CUDAExecutionProvider, and this onnxruntime has only "
                f"{', '.join(available)}: pip install onnxruntime-gpu on a GPU machine, or use --device cpu"
            )
        return [("CUDAExecutionProvider", {"device_id": index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def is_sparse_onnx(path: str | Path) -> bool:
    """Whether any Conv/Gemm/MatMul weight of the file is 2:4 along its reduction axis and >= 50% zeros."""

    model = load_onnx(path)
    for weight in find_weights(model):
        if weight.groups != 1 or weight.shape[weight.axis] % TENSOR_CORE_PATTERN.m:
            continue
        sparsity, compliant = weight_compliance(
            initializer_tensor(model, weight.name), TENSOR_CORE_PATTERN, weight.axis
        )
        if compliant and sparsity >= 0.5:
            return True
    return False


def _vocab_size(path: str | Path) -> int:
    """The smallest first dimension of a Gather table (an embedding's vocabulary), else 100."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    sizes = [inits[n.input[0]][0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits]
    sizes = [s for s in sizes if s > 0]
    return min(sizes) if sizes else 100


def session_spec(
    inputs: Sequence[Any], input_shape: str | None, batch_sizes: Sequence[int] | None
) -> tuple[InputSpec, list[int]]:
    """The input spec for an onnxruntime session's inputs and the batch sizes (see :func:`spec_from_signature`).

    Raises:
        InputError: an input type bench cannot generate, or see :func:`spec_from_signature`.
    """
    signature = []
    for i in inputs:
        if i.type not in _ORT_TYPES:
            raise InputError(f"input {i.name!r} has type {i.type}, which bench cannot generate")
        dims = [d if isinstance(d, int) and d > 0 else None for d in i.shape]
        signature.append((i.name, dims, _ORT_TYPES[i.type]))
    return spec_from_signature(signature, input_shape, batch_sizes)


class OnnxVariant(Variant):
    """One ONNX file in an onnxruntime session."""

    def __init__(self, name: str, path: Path, *, device: str, spec: InputSpec, sparse: bool, vocab: int) -> None:
        super().__init__()
        self.name = name
        self.path = path
        self.sparse = sparse
        self.sparse_kernel = False
        self.timer = "cpu"  # session.run returns host arrays: the call is synchronous
        self._device = device
        self._spec = spec
        self._vocab = vocab
        self._session: Any = None
        self._feeds: dict[int, dict[str, np.ndarray]] = {}
        self.info["file"] = str(path)

    def open(self, batch_sizes: Sequence[int]) -> None:
        ort = _ort()
        options = ort.SessionOptions()
        providers = providers_for(self._device)
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:
            raise InputError(f"onnxruntime cannot load {self.path} ({type(exc).__name__}: {exc})") from exc
        used = self._session.get_providers()
        if self._device.startswith("cuda") and "CUDAExecutionProvider" not in used:
            raise BackendUnavailableError(
                f"onnxruntime could not start its CUDA execution provider for {self.path} (it fell back to "
                f"{', '.join(used)}): check the CUDA/cuDNN libraries onnxruntime-gpu needs"
            )
        self.info["providers"] = used
        self.info["intra_op_num_threads"] = options.intra_op_num_threads or "onnxruntime default (one per core)"

    def _feed(self, batch_size: int) -> dict[str, np.ndarray]:
        if batch_size not in self._feeds:
            self._feeds.clear()
            _, kwargs = example_inputs(self._spec, batch_size=batch_size, vocab_size=self._vocab)
            self._feeds[batch_size] = {k: v.numpy() for k, v in kwargs.items()}
        return self._feeds[batch_size]

    def _run(self, feed: dict[str, np.ndarray]) -> list[Any]:
        try:
            return list(self._session.run(None, feed))
        except Exception as exc:
            shapes = ", ".join(f"{k}:{'x'.join(map(str, v.shape))}" for k, v in feed.items())
            raise InputError(
                f"onnxruntime rejected inputs {shapes} for {self.path} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}): pass --input-shape"
            ) from exc

    def step(self, batch_size: int) -> Callable[[], Any]:
        feed = self._feed(batch_size)
        self._run(feed)
        session = self._session
        return lambda: session.run(None, feed)

    def outputs(self, batch_size: int) -> list[torch.Tensor]:
        outs = self._run(self._feed(batch_size))
        return [
            torch.from_numpy(np.asarray(o)).float() for o in outs if np.issubdtype(np.asarray(o).dtype, np.floating)
        ]

    def close(self) -> None:
        self._session = None
        self._feeds.clear()


def plan(request: PlanRequest) -> BenchPlan:
    """``target`` (and ``vs``) as onnxruntime sessions on the CPU (or CUDA) execution provider.

    Raises:
        BackendUnavailableError: onnxruntime missing, or ``--device cuda`` without its CUDA provider.
        InputError: a missing or unreadable file, inputs that cannot be generated.
    """

    target, vs, device = request.target, request.vs, request.device
    batch_sizes, input_shape, precision = request.batch_sizes, request.input_shape, request.precision
    ort = _ort()
    dev = device or ("cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu")
    providers_for(dev)
    kind, index = parse_device(dev)
    dev = "cpu" if kind == "cpu" else f"cuda:{index or 0}"
    paths = [Path(p) for p in (target, vs) if p]
    for path in paths:
        if path.is_dir():
            raise InputError(f"{path} is a directory, not an ONNX file: give the .onnx file inside it")
        if not path.is_file():
            raise InputError(f"{path} does not exist: give an .onnx file (make one with nmcli export --onnx)")

    for path in paths:  # onnxruntime follows external-data locations: each is checked first
        check_onnx_external_data(path)
    signatures = []
    for path in paths:
        try:
            probe = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise InputError(f"onnxruntime cannot load {path} ({type(exc).__name__}: {exc})") from exc
        signatures.append(probe.get_inputs())
        del probe

    spec, sizes = session_spec(signatures[0], input_shape or stored_input_spec(paths[0]), batch_sizes)
    if len(paths) == 2:
        mine, theirs = ([(i.name, i.type) for i in sig] for sig in signatures)
        if mine != theirs:
            raise InputError(
                f"{paths[0]} and {paths[1]} take different inputs ({mine} vs {theirs}): compare files of one model"
            )
    sparse_flags = [is_sparse_onnx(p) for p in paths]
    if len(paths) == 1:
        names = ["sparse" if sparse_flags[0] else "dense"]
    elif sparse_flags[0] != sparse_flags[1]:
        names = ["sparse" if f else "dense" for f in sparse_flags]
    else:
        names = ["target", "vs"]
    vocab = min(_vocab_size(p) for p in paths)
    variants: list[Variant] = [
        OnnxVariant(name, path, device=dev, spec=spec, sparse=flag, vocab=vocab)
        for name, path, flag in zip(names, paths, sparse_flags, strict=True)
    ]
    notes = []
    if any(sparse_flags):
        notes.append(
            "no sparse kernel was used: onnxruntime's CPU and CUDA execution providers run 2:4 weights with "
            "dense kernels (for 2:4 tensor cores, build a TensorRT engine: nmcli export --trt --sparse)"
        )
    if precision is not None:
        notes.append(f"--precision {precision} was ignored: an ONNX file runs in the precision it was exported with")
    quantized = [stored_quantization(p) for p in paths]
    label = f"{quantized[0]} (Q/DQ)" if quantized[0] else "as exported"
    if len(paths) == 2 and quantized[0] != quantized[1]:
        notes.append(
            f"the files differ in precision ({quantized[0] or 'float'} vs {quantized[1] or 'float'}): "
            "the comparison measures quantization as well as sparsity"
        )
    if dev.startswith("cuda"):
        notes.append("latency is wall time around session.run, including host/device copies of inputs and outputs")
    return BenchPlan(
        "onnxruntime",
        dev,
        label,
        str(spec),
        variants,
        sizes,
        notes,
        {"onnxruntime_providers": providers_for(dev)},
    )


__all__ = ["OnnxVariant", "is_available", "is_sparse_onnx", "plan", "providers_for", "session_spec"]

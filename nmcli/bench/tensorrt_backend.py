"""The tensorrt backend of ``nmcli bench``: a serialized TensorRT engine, and ``--vs`` a second one.

Engines run on a CUDA GPU through ``execute_async_v3`` (TensorRT 8.5 and later) on torch-allocated
buffers, on a dedicated CUDA stream: on the legacy default stream TensorRT adds
``cudaStreamSynchronize`` calls of its own (it warns so), which would be timed too. The CUDA events
of :func:`nmcli.bench.timing.measure` are recorded on that stream. The engine is loaded and run with
its device current (``cuda:N``). TensorRT's warnings are kept in the variant's notes, not hidden.

Whether an engine uses 2:4 sparse tensor-core kernels was decided when it was built
(``nmcli export --trt --sparse`` sets ``SPARSE_WEIGHTS`` and reports the layers), so it is reported
as unknown here; compare a dense and a sparse engine with ``--vs``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from nmcli.bench.device import device_guard
from nmcli.bench.types import BenchPlan, PlanRequest, Variant, spec_from_signature
from nmcli.device import resolve_device
from nmcli.errors import InputError
from nmcli.export.tensorrt import collecting_logger, import_tensorrt
from nmcli.inputs import InputSpec, example_inputs

_TRT_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "BOOL": torch.bool,
}


def is_available() -> bool:
    """Whether the tensorrt package is installed (it also needs a CUDA GPU to run)."""
    return importlib.util.find_spec("tensorrt") is not None


def _torch_dtype(trt_dtype: Any) -> torch.dtype:
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in _TRT_DTYPES:
        raise InputError(f"engine tensor type {name} is not supported by bench")
    return _TRT_DTYPES[name]


def _load_engine(trt: Any, path: Path, logger: Any) -> tuple[Any, Any]:
    """``(runtime, engine)``: the runtime must outlive the engine."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        said = "; ".join(logger.problems[-2:])
        raise InputError(
            f"TensorRT {trt.__version__} cannot deserialize {path}{f' ({said})' if said else ''}: engines only load "
            "with the TensorRT version and GPU model they were built with (rebuild it with nmcli export --trt)"
        )
    return runtime, engine


def _io(trt: Any, engine: Any) -> tuple[list[tuple[str, list[int | None], torch.dtype]], list[str]]:
    inputs: list[tuple[str, list[int | None], torch.dtype]] = []
    outputs: list[str] = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            dims = [d if d >= 0 else None for d in engine.get_tensor_shape(name)]
            inputs.append((name, dims, _torch_dtype(engine.get_tensor_dtype(name))))
        else:
            outputs.append(name)
    return inputs, outputs


class EngineVariant(Variant):
    """One TensorRT engine with an execution context and device buffers."""

    def __init__(self, name: str, path: Path, *, device: str, spec: InputSpec) -> None:
        super().__init__()
        self.name = name
        self.path = path
        self.sparse = None
        self.sparse_kernel = None
        self.timer = "cuda"
        self._device = device
        self._spec = spec
        self._logger: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._outputs: list[str] = []
        self._buffers: dict[str, torch.Tensor] = {}
        self._batch: int | None = None
        self.info["file"] = str(path)

    def open(self, batch_sizes: Sequence[int]) -> None:
        trt = import_tensorrt()
        with device_guard(self._device):  # run_bench holds it too; open() is also called on its own
            self._logger = collecting_logger(trt)
            self._runtime, self._engine = _load_engine(trt, self.path, self._logger)
            self._context = self._engine.create_execution_context()
            self.stream = torch.cuda.Stream(device=self._device)
        _, self._outputs = _io(trt, self._engine)
        self.info["tensorrt"] = trt.__version__

    def _bind(self, batch_size: int) -> None:
        if self._batch == batch_size:
            return
        self._buffers.clear()
        _, kwargs = example_inputs(self._spec, batch_size=batch_size, device=self._device)
        for name, tensor in kwargs.items():
            tensor = tensor.contiguous()
            if not self._context.set_input_shape(name, tuple(tensor.shape)):
                raise InputError(
                    f"{self.path} does not accept {name} of shape {tuple(tensor.shape)}: the engine's optimization "
                    "profile fixes its shapes (rebuild it with --dynamic-batch or pass --input-shape)"
                )
            self._buffers[name] = tensor
            self._context.set_tensor_address(name, tensor.data_ptr())
        for name in self._outputs:
            shape = tuple(self._context.get_tensor_shape(name))
            dtype = _torch_dtype(self._engine.get_tensor_dtype(name))
            out = torch.empty(shape, dtype=dtype, device=self._device)
            self._buffers[name] = out
            self._context.set_tensor_address(name, out.data_ptr())
        # the buffers were filled on the current stream: the engine's stream must see them first
        self.stream.wait_stream(torch.cuda.current_stream(self._device))
        self._batch = batch_size

    def step(self, batch_size: int) -> Callable[[], Any]:
        self._bind(batch_size)
        context = self._context
        handle = self.stream.cuda_stream

        def call() -> None:
            if not context.execute_async_v3(handle):
                raise RuntimeError("TensorRT execute_async_v3 failed")

        return call

    def outputs(self, batch_size: int) -> list[torch.Tensor]:
        self.step(batch_size)()
        self.stream.synchronize()
        for line in self._logger.problems if self._logger is not None else []:
            note = f"TensorRT ({self.name}): {line}"
            if note not in self.notes:
                self.notes.append(note)
        return [self._buffers[n].float().cpu() for n in self._outputs if self._buffers[n].is_floating_point()]

    def close(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
        self._buffers.clear()
        self._context = None
        self._engine = None
        self._runtime = None
        self.stream = None
        self._batch = None


def _signature(trt: Any, path: Path) -> list[tuple[str, list[int | None], torch.dtype]]:
    logger = collecting_logger(trt)
    _runtime, engine = _load_engine(trt, path, logger)
    return _io(trt, engine)[0]


def plan(request: PlanRequest) -> BenchPlan:
    """``target`` (and ``vs``) as TensorRT engines on the GPU.

    Raises:
        BackendUnavailableError: tensorrt is not installed, or torch sees no CUDA GPU.
        InputError: ``--device cpu``, a missing file, or an engine this TensorRT cannot load.
    """
    target, vs, device = request.target, request.vs, request.device
    batch_sizes, input_shape, precision = request.batch_sizes, request.input_shape, request.precision
    if device is not None and device.strip().lower() == "cpu":
        raise InputError("TensorRT engines run on CUDA GPUs only: use --device cuda, or bench the .onnx on the CPU")
    trt = import_tensorrt()
    dev = resolve_device(device or "cuda")  # cuda -> cuda:<current>; no CUDA is exit 3
    paths = [Path(p) for p in (target, vs) if p]
    for path in paths:
        if not path.is_file():
            raise InputError(f"{path} does not exist: give a TensorRT engine (make one with nmcli export --trt)")
    with device_guard(dev):
        signatures = [_signature(trt, p) for p in paths]
    if len(signatures) == 2 and [(n, d) for n, _, d in signatures[0]] != [(n, d) for n, _, d in signatures[1]]:
        raise InputError(f"{paths[0]} and {paths[1]} take different inputs: compare engines of one model")
    spec, sizes = spec_from_signature(signatures[0], input_shape, batch_sizes)
    names = ["target", "vs"][: len(paths)]
    variants: list[Variant] = [EngineVariant(n, p, device=dev, spec=spec) for n, p in zip(names, paths, strict=True)]
    notes = [
        "whether an engine runs 2:4 sparse kernels was fixed when it was built (TensorRT's SPARSE_WEIGHTS flag); "
        "bench cannot tell from the engine file",
        "peak_memory_mb counts the torch-allocated input and output buffers, not TensorRT's own activation memory",
        "engines run on a dedicated CUDA stream (not the legacy default stream), and are timed on it",
    ]
    if precision is not None:
        notes.append(f"--precision {precision} was ignored: an engine runs in the precision it was built with")
    return BenchPlan("tensorrt", dev, "as built", str(spec), variants, sizes, notes, {})


__all__ = ["EngineVariant", "is_available", "plan"]

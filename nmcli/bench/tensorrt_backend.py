"""The tensorrt backend of ``nmcli bench``: a serialized TensorRT engine, and ``--vs`` a second one.

Engines run on a CUDA GPU through TensorRT 10's ``execute_async_v3`` on torch-allocated
buffers, timed with CUDA events. Whether an engine uses 2:4 sparse tensor-core kernels was
decided when it was built (``nmcli export --trt --sparse`` sets ``SPARSE_WEIGHTS``), so it is
reported as unknown here; compare a dense and a sparse engine with ``--vs``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from nmcli.bench.run import BenchPlan, Variant, spec_from_signature
from nmcli.errors import BackendUnavailableError, InputError
from nmcli.inputs import InputSpec, example_inputs

INSTALL_HINT = "pip install 'nmcli[trt]' on a machine with an NVIDIA GPU"
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


def _trt() -> Any:
    if not is_available():
        raise BackendUnavailableError(
            f"the tensorrt backend needs the tensorrt package, which is not installed: {INSTALL_HINT}"
        )
    try:
        import tensorrt
    except Exception as exc:  # installed but broken (missing CUDA libraries)
        raise BackendUnavailableError(
            f"the tensorrt package is installed but cannot be imported ({exc}): {INSTALL_HINT}"
        ) from exc
    return tensorrt


def _torch_dtype(trt_dtype: Any) -> torch.dtype:
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in _TRT_DTYPES:
        raise InputError(f"engine tensor type {name} is not supported by bench")
    return _TRT_DTYPES[name]


def _load_engine(trt: Any, path: Path) -> Any:
    logger = trt.Logger(trt.Logger.ERROR)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise InputError(
            f"TensorRT {trt.__version__} cannot deserialize {path}: engines only load with the TensorRT version "
            "and GPU model they were built with (rebuild it with nmcli export --trt)"
        )
    return engine


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
        self._engine: Any = None
        self._context: Any = None
        self._outputs: list[str] = []
        self._buffers: dict[str, torch.Tensor] = {}
        self._batch: int | None = None
        self.info["file"] = str(path)

    def open(self, batch_sizes: Sequence[int]) -> None:
        trt = _trt()
        torch.cuda.set_device(torch.device(self._device))
        self._engine = _load_engine(trt, self.path)
        self._context = self._engine.create_execution_context()
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
        self._batch = batch_size

    def step(self, batch_size: int) -> Callable[[], Any]:
        self._bind(batch_size)
        context = self._context
        stream = torch.cuda.current_stream()

        def call() -> None:
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")

        return call

    def outputs(self, batch_size: int) -> list[torch.Tensor]:
        self.step(batch_size)()
        torch.cuda.synchronize()
        return [self._buffers[n].float().cpu() for n in self._outputs if self._buffers[n].is_floating_point()]

    def close(self) -> None:
        self._buffers.clear()
        self._context = None
        self._engine = None
        self._batch = None


def plan(
    target: str,
    *,
    vs: str | None = None,
    device: str | None = None,
    batch_sizes: Sequence[int] | None = None,
    input_shape: str | None = None,
    precision: str | None = None,
) -> BenchPlan:
    """``target`` (and ``vs``) as TensorRT engines on the GPU.

    Raises:
        BackendUnavailableError: tensorrt is not installed, or torch sees no CUDA GPU.
        InputError: ``--device cpu``, a missing file, or an engine this TensorRT cannot load.
    """
    if device is not None and not device.startswith("cuda"):
        raise InputError("TensorRT engines run on CUDA GPUs only: use --device cuda, or bench the .onnx on the CPU")
    trt = _trt()
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT engines need a CUDA GPU, and torch sees none: run on a GPU machine")
    dev = device or "cuda"
    paths = [Path(p) for p in (target, vs) if p]
    for path in paths:
        if not path.is_file():
            raise InputError(f"{path} does not exist: give a TensorRT engine (make one with nmcli export --trt)")
    signatures = [_io(trt, _load_engine(trt, p))[0] for p in paths]
    if len(signatures) == 2 and [(n, d) for n, _, d in signatures[0]] != [(n, d) for n, _, d in signatures[1]]:
        raise InputError(f"{paths[0]} and {paths[1]} take different inputs: compare engines of one model")
    spec, sizes = spec_from_signature(signatures[0], input_shape, batch_sizes)
    names = ["target", "vs"][: len(paths)]
    variants: list[Variant] = [EngineVariant(n, p, device=dev, spec=spec) for n, p in zip(names, paths, strict=True)]
    notes = [
        "whether an engine runs 2:4 sparse kernels was fixed when it was built (TensorRT's SPARSE_WEIGHTS flag); "
        "bench cannot tell from the engine file",
        "peak_memory_mb counts the torch-allocated input and output buffers, not TensorRT's own activation memory",
    ]
    if precision is not None:
        notes.append(f"--precision {precision} was ignored: an engine runs in the precision it was built with")
    return BenchPlan("tensorrt", dev, "as built", str(spec), variants, sizes, notes, {})


__all__ = ["EngineVariant", "is_available", "plan"]

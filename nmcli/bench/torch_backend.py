"""The torch backend of ``nmcli bench``: a checkpoint's dense model against its sparse one.

* ``dense``: the original dense model, from the checkpoint's stored dense weights where it has
  them, else rebuilt from its source (same dtype and device as the sparse variant).
* ``sparse``: the pruned model. On a CUDA GPU where a 2:4 kernel runs
  (:func:`nmcli.bench.sparse_kernels.semi_structured_backends`: cuSPARSELt on compute capability
  >= 8.0, CUTLASS on 8.x only), in fp16 or bf16, every ``nn.Linear`` whose weight is 2:4 along its
  input dimension and fits the kernel's shape rules gets semi-structured weights, layer by layer
  (a layer whose kernels fail here keeps its dense weight and is listed). Everywhere else it runs
  the masked weights with dense kernels, and says so.

A model source that is not a checkpoint is timed as it is (one variant, ``model``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from nmcli.bench.device import device_guard
from nmcli.bench.sparse_kernels import (
    device_backends,
    precision_name,
    semi_structured_support,
    swap_plan,
    to_semi_structured,
    tolerance,
)
from nmcli.bench.types import BenchPlan, PlanRequest, Variant, flatten_outputs
from nmcli.device import resolve_device
from nmcli.errors import BackendUnavailableError, InputError, NmcliError
from nmcli.inputs import FLOAT_PRECISIONS, InputSpec, example_inputs, parse_input_spec
from nmcli.models.sources import copy_model, eval_mode, load_model, load_source_model, model_from_checkpoint
from nmcli.nm.pattern import TENSOR_CORE_PATTERN

DTYPES = FLOAT_PRECISIONS


def is_available() -> bool:
    """The torch backend is always available (torch is a dependency)."""
    return True


def _max_abs(tensors: Sequence[torch.Tensor]) -> float:
    return max((float(t.abs().max()) for t in tensors if t.numel()), default=0.0)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class TorchVariant(Variant):
    """A torch model built by ``factory``, cast to ``dtype`` and moved to ``device`` when opened.

    Args:
        backends: the 2:4 kernels to try for the sparse variant (empty: dense kernels only).
    """

    def __init__(
        self,
        name: str,
        factory: Callable[[], nn.Module],
        *,
        device: str,
        dtype: torch.dtype,
        spec: InputSpec,
        compile: bool = False,
        sparse: bool | None = None,
        backends: Sequence[str] = (),
        vocab_size: int = 1000,
    ) -> None:
        super().__init__()
        self.name = name
        self.sparse = sparse
        self.sparse_kernel = False
        self.timer = "cuda" if device.startswith("cuda") else "cpu"
        self._factory = factory
        self._device = device
        self._dtype = dtype
        self._spec = spec
        self._compile = compile
        self._backends = list(backends)
        self._vocab = vocab_size
        self._model: nn.Module | None = None
        self._runner: Callable[..., Any] | None = None
        self._refs: dict[int, list[torch.Tensor]] = {}
        self._inputs: dict[int, tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]] = {}

    def _inputs_for(self, batch_size: int) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        if batch_size not in self._inputs:
            self._inputs.clear()
            self._inputs[batch_size] = example_inputs(
                self._spec, batch_size=batch_size, dtype=self._dtype, device=self._device, vocab_size=self._vocab
            )
        return self._inputs[batch_size]

    def _call(self, runner: Callable[..., Any], batch_size: int) -> Any:
        args, kwargs = self._inputs_for(batch_size)
        try:
            with torch.inference_mode():
                return runner(*args, **kwargs)
        except NmcliError:
            raise
        except Exception as exc:
            if self._compile and type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise BackendUnavailableError(
                    f"torch.compile failed on this machine ({_first_line(exc)}): rerun without --compile"
                ) from exc
            raise InputError(
                f"the {self.name} model rejected inputs {self._spec.with_batch(batch_size)} "
                f"({_first_line(exc)}): pass --input-shape"
            ) from exc

    def _load(self) -> nn.Module:
        # a copy, so that closing the variant frees its device memory and the original stays fp32 on the CPU

        model = eval_mode(copy_model(self._factory())).to(device=self._device, dtype=self._dtype)
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def open(self, batch_sizes: Sequence[int]) -> None:
        model = self._load()
        if self._backends:
            model = self._swap(model, batch_sizes)
        self._model = model
        self._runner = torch.compile(model) if self._compile else model
        self.info["precision"] = precision_name(self._dtype)
        self.info["compiled"] = self._compile

    def _dense_weight(self, name: str) -> nn.Parameter:
        """Layer ``name``'s masked weight from the CPU source, on the device (to undo a swap)."""
        source = dict(self._factory().named_modules())[name]
        assert isinstance(source, nn.Linear)
        weight = source.weight.detach().to(device=self._device, dtype=self._dtype)
        return nn.Parameter(weight, requires_grad=False)

    def _swap(self, model: nn.Module, batch_sizes: Sequence[int]) -> nn.Module:
        """Reference outputs with dense kernels first, then 2:4 weights layer by layer, then one checked forward."""
        eligible, _ = swap_plan(model, self._backends)
        modules = dict(model.named_modules())
        rows: dict[str, int] = {}

        def seen(name: str) -> Callable[..., None]:
            def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0] if args else None
                if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1]:
                    rows[name] = max(rows.get(name, 0), x.numel() // x.shape[-1])

            return hook

        handles = [modules[name].register_forward_pre_hook(seen(name)) for name in eligible]
        try:
            for bs in batch_sizes:
                self._refs[bs] = flatten_outputs(self._call(model, bs))
        finally:
            for handle in handles:
                handle.remove()
        report = to_semi_structured(model, backends=self._backends, probe_rows=rows)
        reverted = self._check_forward(model, report.swapped, batch_sizes[0])
        for name, why in reverted.items():
            report.swapped.remove(name)
            report.kernels.pop(name, None)
            report.alg_ids.pop(name, None)
            report.failed[name] = why
        self.info.update(
            sparse_backend=report.backend,
            semi_structured_layers={name: report.kernels[name] for name in report.swapped},
            cusparselt_alg_ids=report.alg_ids,
            dense_kernel_layers=report.dense_layers,
        )
        self.notes.extend(report.notes)
        total = len(report.swapped) + len(report.skipped) + len(report.failed)
        if report.swapped:
            self.sparse_kernel = True
            line = (
                f"sparse: {len(report.swapped)} of {total} Linear layers run 2:4 semi-structured kernels "
                f"({report.backend}); other layers (convolutions included) run dense kernels"
            )
            if report.failed:
                names = ", ".join(list(report.failed)[:5]) + (" ..." if len(report.failed) > 5 else "")
                line += f"; {len(report.failed)} eligible layer(s) kept dense weights because their kernels failed here: {names}"
            self.notes.append(line)
        else:
            reason = (
                "; ".join(f"{k}: {v}" for k, v in list(report.failed.items())[:3])
                if report.failed
                else "no Linear layer is 2:4 with a shape the kernels accept"
            )
            self.notes.append(
                f"no sparse kernel was used: {reason}. The sparse variant ran its masked weights with dense kernels"
            )
        return model

    def _check_forward(self, model: nn.Module, swapped: Sequence[str], batch_size: int) -> dict[str, str]:
        """Run the swapped model once; a layer that fails inside the real forward goes back to dense."""
        if not swapped:
            return {}
        modules = dict(model.named_modules())
        inside: list[str] = []
        handles = []

        def enter(name: str) -> Callable[..., None]:
            def hook(*_args: Any) -> None:
                inside.append(name)

            return hook

        def leave(*_args: Any) -> None:  # returns None: a forward hook's return value replaces the output
            if inside:
                inside.pop()

        for name in swapped:
            handles.append(modules[name].register_forward_pre_hook(enter(name)))
            handles.append(modules[name].register_forward_hook(leave))
        reverted: dict[str, str] = {}
        try:
            for _ in range(len(swapped) + 1):
                inside.clear()
                try:
                    with torch.inference_mode():
                        args, kwargs = self._inputs_for(batch_size)
                        model(*args, **kwargs)
                        torch.cuda.synchronize()
                    return reverted
                except Exception as exc:  # noqa: BLE001 - the failing layer goes back to dense kernels
                    culprits = [inside[-1]] if inside else [n for n in swapped if n not in reverted]
                    for name in culprits:
                        linear = modules[name]
                        assert isinstance(linear, nn.Linear)
                        linear.weight = self._dense_weight(name)
                        reverted[name] = f"the model's forward failed in it ({_first_line(exc)})"
        finally:
            for handle in handles:
                handle.remove()
        return reverted

    def step(self, batch_size: int) -> Callable[[], Any]:
        runner = self._runner
        assert runner is not None, "open() first"
        args, kwargs = self._inputs_for(batch_size)

        def call() -> Any:
            with torch.inference_mode():
                return runner(*args, **kwargs)

        self._call(runner, batch_size)  # surfaces bad inputs as InputError before timing
        return call

    def outputs(self, batch_size: int) -> list[torch.Tensor]:
        assert self._runner is not None, "open() first"
        return flatten_outputs(self._call(self._runner, batch_size))

    def reference(self, batch_size: int) -> list[torch.Tensor] | None:
        return self._refs.get(batch_size) if self.sparse_kernel else None

    def tolerance(self, reference: Sequence[torch.Tensor]) -> float:
        return tolerance(self._dtype, _max_abs(reference))

    def close(self) -> None:
        self._model = None
        self._runner = None
        self._inputs.clear()


def _input_spec(input_shape: str | None, stored: InputSpec | None, what: str) -> InputSpec:
    if input_shape:
        return parse_input_spec(input_shape)
    if stored is not None:
        return stored
    raise InputError(f"{what} has no stored input spec: pass --input-shape, e.g. 1x3x224x224")


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    return int(vocab) if isinstance(vocab, int) and vocab > 0 else 1000


def plan(request: PlanRequest) -> BenchPlan:
    """The variants of a checkpoint (``dense``, ``sparse``) or of a model source (``model``).

    Raises:
        BackendUnavailableError: ``--device cuda`` without CUDA.
        InputError: ``--vs``, a bad device, no input spec, or a model that cannot be loaded.
    """

    if request.vs is not None:
        raise InputError(
            "--vs compares two ONNX files or two engines; for a checkpoint, bench already times its "
            "dense model against its sparse one"
        )
    target, arch, trust, compile = request.target, request.arch, request.trust, request.compile
    dev = resolve_device(request.device)
    prec = request.precision or ("fp16" if dev.startswith("cuda") else "fp32")
    dtype = DTYPES[prec]
    loaded = load_model(target, arch=arch, trust=trust, model_class=request.model_class)
    spec = _input_spec(request.input_shape, loaded.input_spec, target)
    sizes = list(request.batch_sizes) if request.batch_sizes else [spec.batch_size]
    vocab = _vocab_size(loaded.model)
    notes: list[str] = []
    info: dict[str, Any] = {}
    common: dict[str, Any] = {"device": dev, "dtype": dtype, "spec": spec, "compile": compile, "vocab_size": vocab}
    if loaded.checkpoint is None:
        variant = TorchVariant("model", lambda: loaded.model, **common)
        variant.notes.append(f"{target} is not an nmcli checkpoint: it is timed as it is (no dense/sparse pair)")
        return BenchPlan("torch", dev, prec, str(spec), [variant], sizes, notes, info)
    ckpt = loaded.checkpoint
    sparse_model = loaded.model
    dense_model, how = _dense_model(loaded, arch=arch, trust=trust, model_class=request.model_class)
    info["dense_weights"] = how
    if how.startswith("unavailable"):
        notes.append(
            f"dense weights {how}: the dense variant runs the checkpoint's masked weights with dense kernels "
            "(the same dense-kernel work, but not the original model's outputs)"
        )
    with device_guard(dev):
        reason = semi_structured_support(dev, dtype)
        backends = device_backends(dev) if reason is None else []
    pattern = ckpt.pattern
    if reason is None and pattern is not None and pattern != TENSOR_CORE_PATTERN:
        reason, backends = f"the checkpoint's pattern is {pattern}: only 2:4 has sparse tensor-core kernels", []
    if backends:
        info["semi_structured_kernels_to_try"] = backends
    dense = TorchVariant("dense", lambda: dense_model, sparse=False, **common)
    sparse = TorchVariant("sparse", lambda: sparse_model, sparse=True, backends=backends, **common)
    if reason is not None:
        sparse.notes.append(
            f"no sparse kernel was used: {reason}. The sparse variant ran its masked weights with dense kernels, "
            "so any difference from dense is noise, not sparsity"
        )
    return BenchPlan("torch", dev, prec, str(spec), [dense, sparse], sizes, notes, info)


def _dense_model(loaded: Any, *, arch: str | None, trust: bool, model_class: str) -> tuple[nn.Module, str]:
    """The original dense model of a checkpoint, and where its weights came from."""

    ckpt = loaded.checkpoint
    if ckpt.dense:
        model = model_from_checkpoint(ckpt, arch=arch, trust=trust, weights="dense", model_class=model_class)
        return model, "stored in the checkpoint"
    ref = ckpt.meta.source
    try:
        source = load_source_model(ref, arch=arch, trust=trust, model_class=model_class)
    except NmcliError as exc:
        return copy_model(loaded.model), f"unavailable (rebuilding {ref.spec} failed: {exc})"
    want = {k: tuple(v.shape) for k, v in loaded.model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in source.model.state_dict().items()}
    if want != got:
        return copy_model(loaded.model), f"unavailable ({ref.spec} no longer matches the checkpoint's architecture)"
    return eval_mode(source.model), f"rebuilt from the source {ref.spec}"


__all__ = ["DTYPES", "TorchVariant", "is_available", "plan"]

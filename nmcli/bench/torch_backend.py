"""The torch backend of ``nmcli bench``: a checkpoint's dense model against its sparse one.

* ``dense``: the original dense model, from the checkpoint's stored dense weights where it has
  them, else rebuilt from its source (same dtype and device as the sparse variant).
* ``sparse``: the pruned model. On a CUDA GPU with compute capability >= 8.0, in fp16 or bf16,
  every ``nn.Linear`` whose weight is 2:4 along its input dimension and fits the kernel's shape
  rules gets ``torch.sparse.to_sparse_semi_structured`` weights (cuSPARSELt, falling back to
  CUTLASS). Everywhere else it runs the masked weights with dense kernels, and says so.

A model source that is not a checkpoint is timed as it is (one variant, ``model``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nmcli.bench.run import BenchPlan, Variant, flatten_outputs
from nmcli.errors import BackendUnavailableError, InputError, NmcliError
from nmcli.inputs import FLOAT_PRECISIONS, InputSpec, example_inputs, parse_input_spec
from nmcli.patterns import TENSOR_CORE_PATTERN, is_compliant

DTYPES = FLOAT_PRECISIONS
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)
# max_abs_diff <= atol + rtol * max|reference|, sparse kernel vs dense kernel at the same precision
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (1e-1, 5e-2)}


def is_available() -> bool:
    """The torch backend is always available (torch is a dependency)."""
    return True


def cuda_available() -> bool:
    """Whether torch sees a CUDA device."""
    return torch.cuda.is_available()


def resolve_device(device: str | None) -> str:
    """``None`` -> ``cuda`` when available, else ``cpu``.

    Raises:
        BackendUnavailableError: ``cuda`` asked for and torch sees no CUDA device.
    """
    if device is None:
        return "cuda" if cuda_available() else "cpu"
    if device.startswith("cuda") and not cuda_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"a CUDA {torch.version.cuda} build"
        raise BackendUnavailableError(
            f"--device {device} needs a CUDA GPU, and torch ({torch.__version__}, {build}) sees none: "
            "run on a GPU machine with a CUDA build of torch, or use --device cpu"
        )
    return device


def semi_structured_support(device: str, dtype: torch.dtype) -> str | None:
    """Why torch's 2:4 semi-structured kernels cannot run here, or None when they can."""
    if not device.startswith("cuda"):
        return (
            f"the device is {device}: torch's 2:4 semi-structured kernels need an NVIDIA GPU with compute "
            "capability >= 8.0 (Ampere or later)"
        )
    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < MIN_CAPABILITY:
        return (
            f"{torch.cuda.get_device_name(torch.device(device))} has compute capability "
            f"{capability[0]}.{capability[1]}: 2:4 sparse tensor cores need 8.0 or later (Ampere)"
        )
    if dtype not in SEMI_STRUCTURED_DTYPES:
        return f"precision is {_precision_name(dtype)}: torch's 2:4 semi-structured kernels need fp16 or bf16 (--precision fp16)"
    return None


def _precision_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


@dataclass
class SwapReport:
    """Which ``nn.Linear`` layers got semi-structured weights, and why the others did not."""

    swapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    backend: str | None = None


def _mha_children(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            names.update(f"{name}.{child}" if name else child for child, _ in module.named_modules() if child)
    return names


def swap_plan(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """The Linear layers whose weight could take semi-structured kernels, and why each other one cannot.

    The weight must be 2-D fp16/bf16, 2:4 along its input dimension, and a multiple of the kernel's
    minimum tile (cuSPARSELt: 16x16 fp16/bf16; CUTLASS: 32x64).
    """
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = (
        SparseSemiStructuredTensorCUSPARSELT
        if torch.backends.cusparselt.is_available() and not torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS
        else SparseSemiStructuredTensorCUTLASS
    )
    inside_mha = _mha_children(model)
    eligible: list[str] = []
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        if name in inside_mha:
            skipped[name] = "inside nn.MultiheadAttention, which calls its projections itself"
        elif weight.dtype not in SEMI_STRUCTURED_DTYPES:
            skipped[name] = f"dtype {weight.dtype}: kernels need fp16/bf16"
        elif not is_compliant(weight.detach().ne(0), TENSOR_CORE_PATTERN, axis=1):  # -0.0 is a zero to the kernels
            skipped[name] = "weight is not 2:4 along its input dimension"
        else:
            limits = cls._DTYPE_SHAPE_CONSTRAINTS[weight.dtype]
            rows, cols = weight.shape
            r, c = limits.sparse_min_rows, limits.sparse_min_cols
            if rows % r or cols % c or rows < r or cols < c:
                skipped[name] = f"shape {rows}x{cols}: {cls.BACKEND} needs multiples of {r}x{c}"
            else:
                eligible.append(name)
    return eligible, skipped


def to_semi_structured(model: nn.Module, *, force_cutlass: bool = False) -> SwapReport:
    """Replace eligible Linear weights (see :func:`swap_plan`) by semi-structured sparse tensors, in place.

    Args:
        model: a model on a CUDA device, in fp16 or bf16.
        force_cutlass: use CUTLASS kernels even where cuSPARSELt is available.
    """
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass or not torch.backends.cusparselt.is_available()
    try:
        eligible, skipped = swap_plan(model)
        report = SwapReport(
            skipped=skipped, backend="cutlass" if SparseSemiStructuredTensor._FORCE_CUTLASS else "cusparselt"
        )
        modules = dict(model.named_modules())
        for name in eligible:
            linear = modules[name]
            assert isinstance(linear, nn.Linear)
            weight = linear.weight.detach().contiguous()
            linear.weight = nn.Parameter(to_sparse_semi_structured(weight), requires_grad=False)
            report.swapped.append(name)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous
    return report


def _max_abs(tensors: Sequence[torch.Tensor]) -> float:
    return max((float(t.abs().max()) for t in tensors if t.numel()), default=0.0)


class TorchVariant(Variant):
    """A torch model built by ``factory``, cast to ``dtype`` and moved to ``device`` when opened."""

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
        semi_structured: bool = False,
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
        self._semi_structured = semi_structured
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
                    f"torch.compile failed on this machine ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
                    "rerun without --compile"
                ) from exc
            raise InputError(
                f"the {self.name} model rejected inputs {self._spec.with_batch(batch_size)} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): pass --input-shape"
            ) from exc

    def open(self, batch_sizes: Sequence[int]) -> None:
        # a copy, so that closing the variant frees its device memory and the original stays fp32 on the CPU
        model = copy.deepcopy(self._factory()).eval().to(device=self._device, dtype=self._dtype)
        for p in model.parameters():
            p.requires_grad_(False)
        if self._semi_structured:
            model = self._swap(model, batch_sizes)
        self._model = model
        self._runner = torch.compile(model) if self._compile else model
        self.info["precision"] = _precision_name(self._dtype)
        self.info["compiled"] = self._compile

    def _swap(self, model: nn.Module, batch_sizes: Sequence[int]) -> nn.Module:
        """Reference outputs with dense kernels first, then semi-structured weights (cuSPARSELt, then CUTLASS)."""
        for bs in batch_sizes:
            self._refs[bs] = flatten_outputs(self._call(model, bs))
        errors: list[str] = []
        for force_cutlass in (False, True):
            if force_cutlass and not torch.backends.cusparselt.is_available():
                break  # the first try already used CUTLASS
            candidate = copy.deepcopy(model)
            try:
                report = to_semi_structured(candidate, force_cutlass=force_cutlass)
                if not report.swapped:
                    break
                with torch.inference_mode():
                    args, kwargs = self._inputs_for(batch_sizes[0])
                    candidate(*args, **kwargs)
                    torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - a kernel that cannot run here: try the next, then dense
                errors.append(
                    f"{'cutlass' if force_cutlass else 'cusparselt'}: {type(exc).__name__}: {exc}".splitlines()[0]
                )
                del candidate
                continue
            self.sparse_kernel = True
            self.info.update(
                sparse_backend=report.backend,
                semi_structured_layers=report.swapped,
                dense_kernel_layers=report.skipped,
            )
            self.notes.append(
                f"sparse: {len(report.swapped)} of {len(report.swapped) + len(report.skipped)} Linear layers run "
                f"2:4 semi-structured kernels ({report.backend}); other layers (convolutions included) run dense kernels"
            )
            return candidate
        _, skipped = swap_plan(model)
        self.info["dense_kernel_layers"] = skipped
        reason = "; ".join(errors) if errors else "no Linear layer is 2:4 with a shape the kernels accept"
        self.notes.append(
            f"no sparse kernel was used: {reason}. The sparse variant ran its masked weights with dense kernels"
        )
        return model

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
        atol, rtol = TOLERANCES[self._dtype]
        return atol + rtol * _max_abs(reference)

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


def plan(
    target: str,
    *,
    device: str | None = None,
    batch_sizes: Sequence[int] | None = None,
    input_shape: str | None = None,
    precision: str | None = None,
    compile: bool = False,
    arch: str | None = None,
    trust: bool = False,
) -> BenchPlan:
    """The variants of a checkpoint (``dense``, ``sparse``) or of a model source (``model``).

    Raises:
        BackendUnavailableError: ``--device cuda`` without CUDA.
        InputError: no input spec, or a model that cannot be loaded.
    """
    from nmcli.sources import load_model

    dev = resolve_device(device)
    prec = precision or ("fp16" if dev.startswith("cuda") else "fp32")
    dtype = DTYPES[prec]
    loaded = load_model(target, arch=arch, trust=trust)
    spec = _input_spec(input_shape, loaded.input_spec, target)
    sizes = list(batch_sizes) if batch_sizes else [spec.batch_size]
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
    dense_model, how = _dense_model(loaded, arch=arch, trust=trust)
    info["dense_weights"] = how
    if how.startswith("unavailable"):
        notes.append(
            f"dense weights {how}: the dense variant runs the checkpoint's masked weights with dense kernels "
            "(the same dense-kernel work, but not the original model's outputs)"
        )
    reason = semi_structured_support(dev, dtype)
    pattern = ckpt.pattern
    if reason is None and pattern is not None and pattern != TENSOR_CORE_PATTERN:
        reason = f"the checkpoint's pattern is {pattern}: only 2:4 has sparse tensor-core kernels"
    dense = TorchVariant("dense", lambda: dense_model, sparse=False, **common)
    sparse = TorchVariant("sparse", lambda: sparse_model, sparse=True, semi_structured=reason is None, **common)
    if reason is not None:
        sparse.notes.append(
            f"no sparse kernel was used: {reason}. The sparse variant ran its masked weights with dense kernels, "
            "so any difference from dense is noise, not sparsity"
        )
    return BenchPlan("torch", dev, prec, str(spec), [dense, sparse], sizes, notes, info)


def _dense_model(loaded: Any, *, arch: str | None, trust: bool) -> tuple[nn.Module, str]:
    """The original dense model of a checkpoint, and where its weights came from."""
    from nmcli.sources import load_source_model, model_from_checkpoint

    ckpt = loaded.checkpoint
    if ckpt.dense:
        model = model_from_checkpoint(ckpt, arch=arch, trust=trust, weights="dense")
        return model, "stored in the checkpoint"
    ref = ckpt.meta.source
    try:
        source = load_source_model(ref, arch=arch, trust=trust)
    except NmcliError as exc:
        return copy.deepcopy(loaded.model), f"unavailable (rebuilding {ref.spec} failed: {exc})"
    want = {k: tuple(v.shape) for k, v in loaded.model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in source.model.state_dict().items()}
    if want != got:
        return copy.deepcopy(loaded.model), f"unavailable ({ref.spec} no longer matches the checkpoint's architecture)"
    return source.model.eval(), f"rebuilt from the source {ref.spec}"


__all__ = [
    "DTYPES",
    "SwapReport",
    "TorchVariant",
    "cuda_available",
    "is_available",
    "plan",
    "resolve_device",
    "semi_structured_support",
    "swap_plan",
    "to_semi_structured",
]

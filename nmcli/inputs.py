"""Input specs (``--input-shape``): parsing, printing, and building example inputs.

``1x3x224x224`` is one float32 input; ``input_ids:1x128:int64,attention_mask:1x128:int64`` names
several. Once given to any command the spec is stored in the checkpoint and reused.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from nmcli.errors import InputError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "bool": torch.bool,
}
_CANONICAL = {v: k for k, v in reversed(list(_DTYPES.items()))}

# The floating-point precisions that --precision names (finetune, export, bench).
FLOAT_PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DIMS_RE = re.compile(r"^\d+(x\d+)*$")
# The most elements one input tensor may have: 32-bit indexing in ONNX Runtime and TensorRT kernels.
MAX_INPUT_ELEMENTS = 2**31 - 1


@dataclass(frozen=True)
class InputTensor:
    """One model input: its name (``""`` for a single positional input), shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        dims = "x".join(str(d) for d in self.shape)
        if not self.name and self.dtype == torch.float32:
            return dims
        return f"{self.name or 'input'}:{dims}:{_CANONICAL[self.dtype]}"


@dataclass(frozen=True)
class InputSpec:
    """The inputs a model takes, in call order."""

    tensors: tuple[InputTensor, ...]

    def __str__(self) -> str:
        return ",".join(str(t) for t in self.tensors)

    @property
    def named(self) -> bool:
        return any(t.name for t in self.tensors)

    @property
    def batch_size(self) -> int:
        return self.tensors[0].shape[0] if self.tensors and self.tensors[0].shape else 1

    def with_batch(self, batch_size: int) -> InputSpec:
        """The same spec with the leading (batch) dimension of every input set to ``batch_size``."""
        return InputSpec(
            tuple(
                InputTensor(t.name, (batch_size, *t.shape[1:]) if t.shape else t.shape, t.dtype) for t in self.tensors
            )
        )


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``1x3x224x224`` or ``name:1x128:int64,name2:1x128:int64``.

    Raises:
        InputError: the text does not follow that syntax.
    """
    text = text.strip()
    if not text:
        raise InputError("empty --input-shape: give e.g. 1x3x224x224 or input_ids:1x128:int64")
    tensors: list[InputTensor] = []
    for part in text.split(","):
        fields = [f.strip() for f in part.strip().split(":")]
        name, dims, dtype_name = "", "", "float32"
        if len(fields) == 1:
            dims = fields[0]
        elif len(fields) == 2:
            name, dims = fields
        elif len(fields) == 3:
            name, dims, dtype_name = fields
        if not _DIMS_RE.match(dims) or (len(fields) > 1 and not name):
            raise InputError(f"malformed input shape {part!r}: write 1x3x224x224, or name:1x128:int64 for named inputs")
        if dtype_name.lower() not in _DTYPES:
            raise InputError(
                f"unknown dtype {dtype_name!r} in --input-shape: use one of {', '.join(sorted(set(_CANONICAL.values())))}"
            )
        shape = tuple(int(d) for d in dims.split("x"))
        if any(d <= 0 for d in shape):
            raise InputError(f"input shape {part!r} has a zero dimension")
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise InputError(
                f"input shape {part!r} has {math.prod(shape):,} elements, more than the {MAX_INPUT_ELEMENTS:,} "
                "(2^31 - 1) that ONNX Runtime and TensorRT index: give a smaller --input-shape"
            )
        tensors.append(InputTensor(name, shape, _DTYPES[dtype_name.lower()]))
    return InputSpec(tuple(tensors))


def example_inputs(
    spec: InputSpec,
    *,
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    vocab_size: int = 1000,
    seed: int = 0,
) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """Random inputs that fit ``spec``: positional args and keyword args to call the model with.

    Float inputs are standard normal (cast to ``dtype`` when given); integer inputs named like
    masks are all ones, other integer inputs (token ids) are uniform in ``[0, vocab_size)``.
    Named inputs go to keyword arguments, an unnamed one is positional.
    """
    if batch_size is not None:
        spec = spec.with_batch(batch_size)
    gen = torch.Generator().manual_seed(seed)
    args: list[torch.Tensor] = []
    kwargs: dict[str, torch.Tensor] = {}
    for t in spec.tensors:
        try:
            if t.dtype.is_floating_point:
                value = torch.randn(t.shape, generator=gen).to(dtype or t.dtype)
            elif t.dtype == torch.bool or "mask" in t.name:
                value = torch.ones(t.shape, dtype=t.dtype)
            elif "type" in t.name:
                value = torch.zeros(t.shape, dtype=t.dtype)
            else:
                value = torch.randint(0, vocab_size, t.shape, generator=gen, dtype=t.dtype)
            value = value.to(device)
        except (RuntimeError, MemoryError) as exc:  # torch reports a failed allocation as RuntimeError
            if isinstance(exc, RuntimeError) and "alloc" not in str(exc).lower() and "memory" not in str(exc).lower():
                raise
            raise InputError(
                f"input {t} ({math.prod(t.shape):,} elements) does not fit in memory: give a smaller --input-shape"
            ) from exc
        if t.name:
            kwargs[t.name] = value
        else:
            args.append(value)
    return tuple(args), kwargs

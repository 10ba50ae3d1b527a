"""Training data specs for ``nmcli finetune --data SPEC``.

| spec | meaning |
|---|---|
| ``tensors:FILE.safetensors`` | ``inputs`` (optional integer ``targets`` -> cross-entropy, float -> MSE); or named model inputs (``input_ids``, ``attention_mask``...) |
| ``text:FILE.txt`` | one example per line, tokenized with the tokenizer of the checkpoint's ``hf:`` source |
| ``imagefolder:DIR`` | one class per sub-folder, resized to the checkpoint's input shape (``vision`` extra) |
| ``py:module:callable`` | returns a torch ``Dataset`` or an iterable of batches, or ``(data, loss)`` |

Every spec becomes a :class:`TrainData`: a map-style set of examples (shuffled with the seed and
sharded over data-parallel ranks by the training loop) or an iterable of ready batches. A batch
is a :class:`Batch`: positional inputs, keyword inputs and optional targets.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nmcli.errors import BackendUnavailableError, DataError, NmcliError, SourceError
from nmcli.usercode import import_factory

LossFn = Callable[[Any, "torch.Tensor | None"], torch.Tensor]
TARGET_KEYS = ("targets", "target")
DATA_PREFIXES = ("tensors:", "text:", "imagefolder:", "py:")


@dataclass
class Batch:
    """One batch: the model is called as ``model(*args, **kwargs)``; ``targets`` feed the task loss."""

    args: tuple[torch.Tensor, ...] = ()
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            tuple(a.to(device) for a in self.args),
            {k: v.to(device) for k, v in self.kwargs.items()},
            None if self.targets is None else self.targets.to(device),
        )

    @property
    def size(self) -> int:
        for value in (*self.args, *self.kwargs.values()):
            if value.dim():
                return int(value.shape[0])
        return 1

    def shard(self, rank: int, world: int) -> Batch:
        """This rank's contiguous share of the batch along dim 0 (rows ``rank::world`` would reorder)."""
        if world == 1:
            return self
        size = self.size
        if size % world:
            raise DataError(f"a batch of {size} examples cannot be split evenly over {world} processes")
        per = size // world
        part = slice(rank * per, (rank + 1) * per)
        return Batch(
            tuple(a[part] for a in self.args),
            {k: v[part] for k, v in self.kwargs.items()},
            None if self.targets is None else self.targets[part],
        )


@dataclass
class TrainData:
    """Loaded training data.

    Attributes:
        spec: the ``--data`` spec.
        examples: a map-style dataset (``len`` and ``[i]``), or None.
        batches: an iterable of ready batches (re-iterated every epoch), or None.
        collate: turns a list of examples into a :class:`Batch`.
        loss: an optional ``loss(outputs, targets)`` from a ``py:`` spec.
        causal_lm_labels: data for a causal LM trained without a teacher: every batch with
            ``input_ids`` (and no labels or targets) gets next-token labels (:func:`causal_lm_labels`).
    """

    spec: str
    examples: Any = None
    batches: Iterable[Any] | None = None
    collate: Callable[[list[Any]], Batch] = field(default=lambda items: collate_items(items))
    loss: LossFn | None = None
    causal_lm_labels: bool = False

    def __len__(self) -> int:
        if self.examples is not None:
            return len(self.examples)
        if self.batches is not None and hasattr(self.batches, "__len__"):
            return len(self.batches)  # type: ignore[arg-type]
        raise TypeError("iterable data has no length")

    @property
    def map_style(self) -> bool:
        return self.examples is not None

    def take(self, indices: Sequence[int]) -> Batch:
        """The batch of the examples at ``indices``."""
        if hasattr(self.examples, "take"):
            taken: Batch = self.examples.take(indices)
        else:
            taken = self.collate([self.examples[i] for i in indices])
        return causal_lm_labels(taken) if self.causal_lm_labels else taken

    def iter_batches(self) -> Iterator[Batch]:
        """One pass over pre-batched data."""
        assert self.batches is not None
        for item in self.batches:
            batch = to_batch(item)
            yield causal_lm_labels(batch) if self.causal_lm_labels else batch


def describe_batch(batch: Batch) -> str:
    """The batch's tensors as ``name 4x16 int64`` (positional ones unnamed), for messages."""

    def one(value: torch.Tensor) -> str:
        dims = "x".join(str(d) for d in value.shape) or "scalar"
        return f"{dims} {str(value.dtype).removeprefix('torch.')}"

    parts = [one(a) for a in batch.args] + [f"{k} {one(v)}" for k, v in batch.kwargs.items()]
    return ", ".join(parts) or "no tensors"


def model_expects(model: torch.nn.Module) -> str:
    """What the model's first layer takes, for messages (``3 input channels (Conv2d)``); empty if unknown."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return f"integer token ids below {module.num_embeddings} (Embedding)"
        if isinstance(module, nn.modules.conv._ConvNd):
            return f"{module.in_channels} input channels ({type(module).__name__})"
        if isinstance(module, nn.Linear):
            return f"{module.in_features} input features (Linear)"
    return ""


class _FitsProbeStop(Exception):
    """Raised by the probe's hook at ``stop_before``: the data fits that far."""


def check_batch_fits(
    model: torch.nn.Module,
    batch: Batch,
    what: str,
    *,
    extra: Mapping[str, Any] | None = None,
    stop_before: torch.nn.Module | None = None,
) -> None:
    """Run ``model`` once on ``batch`` (up to ``stop_before`` when given), so data that does not fit
    the model is a :class:`DataError` with its shapes before any work, not a torch error later.

    ``what`` names the data in the message (``--calib data.safetensors``).

    Raises:
        DataError: the model raised on the batch; the message gives the batch's shapes and dtypes,
            what the model's first layer takes and the first line of torch's error.
    """

    def stop(*_: Any, **__: Any) -> None:
        raise _FitsProbeStop

    handle = stop_before.register_forward_pre_hook(stop, with_kwargs=True) if stop_before is not None else None
    try:
        with torch.no_grad():
            model(*batch.args, **batch.kwargs, **(extra or {}))
    except _FitsProbeStop:
        pass
    except NmcliError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        line = f"{type(exc).__name__}: {text[0] if text else ''}"
        expects = model_expects(model)
        wanted = f"; the model takes {expects}" if expects else ""
        raise DataError(
            f"{what} does not fit the model: its first batch holds {describe_batch(batch)}{wanted} ({line}); "
            "give data shaped like the model's input"
        ) from exc
    finally:
        if handle is not None:
            handle.remove()


def causal_lm_labels(batch: Batch) -> Batch:
    """``batch`` with next-token labels for a causal LM: ``labels = input_ids``, ``-100`` where
    ``attention_mask`` is 0 (transformers shifts them inside the model).

    A batch without ``input_ids``, or that already has ``labels`` or targets, is returned as it is.
    """
    ids = batch.kwargs.get("input_ids")
    if ids is None or "labels" in batch.kwargs or batch.targets is not None:
        return batch
    labels = ids.clone()
    mask = batch.kwargs.get("attention_mask")
    if mask is not None:
        labels[mask == 0] = -100
    return Batch(batch.args, {**batch.kwargs, "labels": labels}, None)


def to_batch(item: Any) -> Batch:
    """A :class:`Batch` from a batched tensor, ``(inputs, targets)`` pair, dict or Batch."""
    if isinstance(item, Batch):
        return item
    if isinstance(item, torch.Tensor):
        return Batch((item,))
    if isinstance(item, Mapping):
        targets = next((item[k] for k in TARGET_KEYS if k in item), None)
        kwargs = {str(k): v for k, v in item.items() if k not in TARGET_KEYS}
        bad = [k for k, v in kwargs.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise DataError(f"batch field(s) {', '.join(bad)} are not tensors: return tensors from the data")
        return Batch((), kwargs, targets)
    if isinstance(item, (tuple, list)):
        if not item or not all(isinstance(v, torch.Tensor) for v in item):
            raise DataError("a batch given as a tuple must hold tensors: (inputs,) or (inputs, targets)")
        if len(item) == 1:
            return Batch((item[0],))
        return Batch(tuple(item[:-1]), {}, item[-1])
    raise DataError(
        f"cannot use a {type(item).__name__} as a batch: give a tensor, (inputs, targets) or a dict of tensors"
    )


def collate_items(items: list[Any]) -> Batch:
    """Stack examples (tensors, ``(input, target)`` pairs or dicts) into one :class:`Batch`."""
    from torch.utils.data import default_collate

    try:
        stacked = default_collate(items)
    except Exception as exc:
        raise DataError(f"examples cannot be stacked into a batch ({exc}): give tensors of equal shape") from exc
    return to_batch(stacked)


class TensorExamples:
    """Examples held as whole tensors (first dim = example); batches are index selections."""

    def __init__(self, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor], targets: torch.Tensor | None):
        self.args, self.kwargs, self.targets = args, kwargs, targets
        sizes = {int(t.shape[0]) for t in (*args, *kwargs.values(), *([targets] if targets is not None else []))}
        if len(sizes) != 1:
            raise DataError(f"tensors in the data file have different first dimensions {sorted(sizes)}: align them")
        self.n = sizes.pop()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Batch:
        return self.take([i])

    def take(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return Batch(
            tuple(a[idx] for a in self.args),
            {k: v[idx] for k, v in self.kwargs.items()},
            None if self.targets is None else self.targets[idx],
        )


def _file(spec: str, prefix: str, *, folder: bool = False) -> Path:
    path = Path(spec[len(prefix) :]).expanduser()
    if not path.exists():
        raise DataError(f"--data {spec}: {path} does not exist")
    if folder and not path.is_dir():
        raise DataError(f"--data {spec}: {path} is not a directory of class sub-folders")
    if not folder and not path.is_file():
        raise DataError(f"--data {spec}: {path} is a directory, not a file: give the {prefix[:-1]} file itself")
    if folder:
        if not os.access(path, os.R_OK | os.X_OK):
            raise DataError(f"--data {spec}: {path} cannot be read (permission denied)")
        return path
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise DataError(f"--data {spec}: {path} cannot be read ({exc.strerror})") from exc
    return path


def check_data_spec(spec: str, option: str = "--data") -> None:
    """Fail fast on a data spec whose file or folder is missing or unreadable, before any model is loaded.

    Raises:
        DataError: unknown prefix, or a missing/unreadable path (the message names ``option``).
    """
    try:
        if spec.startswith(("tensors:", "text:")):
            _file(spec, spec.split(":", 1)[0] + ":")
        elif spec.startswith("imagefolder:"):
            _file(spec, "imagefolder:", folder=True)
        elif not spec.startswith("py:"):
            raise DataError(
                f"unknown --data spec {spec!r}: use tensors:FILE.safetensors, text:FILE.txt, imagefolder:DIR "
                "or py:module:callable"
            )
    except DataError as exc:
        raise DataError(str(exc).replace("--data", option, 1)) from exc


def load_tensors(spec: str) -> TrainData:
    """``tensors:FILE.safetensors``: ``inputs`` (+ ``targets``), or named inputs (+ ``targets``)."""
    path = _file(spec, "tensors:")
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    except Exception as exc:
        raise DataError(f"--data {spec}: not a readable safetensors file ({exc})") from exc
    targets = next((tensors.pop(k) for k in TARGET_KEYS if k in tensors), None)
    if "inputs" in tensors:
        inputs = tensors.pop("inputs")
        if tensors:
            raise DataError(
                f"--data {spec}: unexpected tensors {', '.join(sorted(tensors))} beside 'inputs': "
                "store 'inputs' and optional 'targets', or only named model inputs"
            )
        examples = TensorExamples((inputs,), {}, targets)
    elif tensors:
        examples = TensorExamples((), tensors, targets)
    else:
        raise DataError(f"--data {spec}: no 'inputs' tensor: store the inputs under 'inputs' (and 'targets')")
    if targets is not None and (targets.dtype.is_complex or targets.dtype == torch.bool):
        raise DataError(f"--data {spec}: targets must be integer (classes) or float (regression)")
    return TrainData(spec, examples=examples)


class _TextExamples:
    def __init__(self, encodings: list[dict[str, list[int]]]):
        self.encodings = encodings

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.encodings[i]


def load_text(spec: str, source_spec: str, max_length: int, causal_lm: bool) -> TrainData:
    """``text:FILE.txt``: one example per non-empty line, tokenized with the ``hf:`` source's tokenizer."""
    path = _file(spec, "text:")
    if not source_spec.startswith("hf:"):
        raise DataError(
            f"--data {spec} needs a tokenizer, which only an hf: model source has (this checkpoint's source is "
            f"{source_spec}): use tensors: or py: data"
        )
    try:
        import transformers
    except ImportError as exc:
        raise BackendUnavailableError("text: data needs transformers: pip install 'nmcli[hf]'") from exc
    try:
        # trust_remote_code=False: never run a tokenizer's Python files named in the directory's auto_map.
        tokenizer = transformers.AutoTokenizer.from_pretrained(source_spec[3:], trust_remote_code=False)
    except Exception as exc:
        raise DataError(f"--data {spec}: cannot load the tokenizer of {source_spec} ({exc})") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError(f"--data {spec}: the tokenizer of {source_spec} has no pad or eos token")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise DataError(f"--data {spec}: not UTF-8 text ({exc})") from exc
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"--data {spec}: the file has no non-empty lines")
    encoded = tokenizer(lines, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    encodings = [{k: encoded[k][i] for k in keys} for i in range(len(lines))]

    def collate(items: list[dict[str, list[int]]]) -> Batch:
        padded = tokenizer.pad(items, return_tensors="pt")
        kwargs = {k: padded[k] for k in keys}
        if causal_lm:
            labels = kwargs["input_ids"].clone()
            labels[kwargs["attention_mask"] == 0] = -100
            kwargs["labels"] = labels
        return Batch((), kwargs, None)

    return TrainData(spec, examples=_TextExamples(encodings), collate=collate, causal_lm_labels=causal_lm)


def load_imagefolder(spec: str, input_shape: Sequence[int] | None) -> TrainData:
    """``imagefolder:DIR``: one class per sub-folder, resized to the checkpoint's ``1xCxHxW`` input shape."""
    try:
        from torchvision import datasets, transforms
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        raise BackendUnavailableError(
            f"--data {spec} needs torchvision, which is not installed: pip install 'nmcli[vision]'"
        ) from exc
    path = _file(spec, "imagefolder:", folder=True)
    if input_shape is None or len(input_shape) != 4:
        raise DataError(
            f"--data {spec} resizes images to the checkpoint's input shape, which it lacks: "
            "prune with --input-shape 1x3xHxW"
        )
    channels, height, width = input_shape[1], input_shape[2], input_shape[3]
    steps: list[Any] = [transforms.Resize((height, width))]
    if channels == 1:
        steps.append(transforms.Grayscale(1))
    steps.append(transforms.ToTensor())
    try:
        dataset = datasets.ImageFolder(str(path), transform=transforms.Compose(steps))
    except Exception as exc:
        raise DataError(f"--data {spec}: {exc}") from exc
    return TrainData(spec, examples=dataset)


def load_py(spec: str) -> TrainData:
    """``py:module:callable`` (or ``py:path/file.py:callable``): a Dataset, an iterable of batches, or ``(data, loss)``."""

    try:
        factory = import_factory(spec)
        produced = factory()
    except SourceError as exc:
        raise DataError(f"--data {exc}") from exc
    except Exception as exc:
        raise DataError(f"--data {spec}: the callable raised {type(exc).__name__}: {exc}") from exc
    loss: LossFn | None = None
    if isinstance(produced, tuple) and len(produced) == 2 and callable(produced[1]):
        produced, loss = produced
    if hasattr(produced, "__getitem__") and hasattr(produced, "__len__") and not isinstance(produced, (list, tuple)):
        return TrainData(spec, examples=produced, loss=loss)
    if isinstance(produced, Iterable):
        return TrainData(spec, batches=produced, loss=loss)
    raise DataError(
        f"--data {spec}: the callable returned {_article(type(produced).__name__)}: return a torch Dataset, "
        "an iterable of batches, or (data, loss)"
    )


def load_data(
    spec: str,
    *,
    source_spec: str = "",
    input_shape: Sequence[int] | None = None,
    max_length: int = 128,
    causal_lm: bool = False,
) -> TrainData:
    """Load a ``--data`` spec.

    Args:
        spec: ``tensors:``, ``text:``, ``imagefolder:`` or ``py:``.
        source_spec: the model's source (``text:`` needs an ``hf:`` one for its tokenizer).
        input_shape: the checkpoint's first input shape (``imagefolder:`` resizes to it).
        max_length: ``text:`` truncation length in tokens.
        causal_lm: a causal LM trained without a teacher: batches with ``input_ids`` get
            next-token labels, whatever the spec.

    Raises:
        DataError: a malformed or unreadable spec.
        BackendUnavailableError: the spec needs a missing optional package.
    """
    data: TrainData | None = None
    if spec.startswith("tensors:"):
        data = load_tensors(spec)
    elif spec.startswith("text:"):
        data = load_text(spec, source_spec, max_length, causal_lm)
    elif spec.startswith("imagefolder:"):
        data = load_imagefolder(spec, input_shape)
    elif spec.startswith("py:"):
        data = load_py(spec)
    if data is not None:
        data.causal_lm_labels = causal_lm
        return data
    raise DataError(
        f"unknown --data spec {spec!r}: use tensors:FILE.safetensors, text:FILE.txt, imagefolder:DIR or py:module:callable"
    )


def _article(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


class SubsetExamples:
    """The examples of a map-style data set at ``indices`` (a train or held-out split)."""

    def __init__(self, data: TrainData, indices: Sequence[int]) -> None:
        self.data, self.indices = data, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.data.examples[self.indices[i]]

    def take(self, indices: Sequence[int]) -> Batch:
        return self.data.take([self.indices[i] for i in indices])


def split_data(data: TrainData, held_out: Sequence[int]) -> tuple[TrainData, TrainData]:
    """``data`` split into (the rest, the examples at ``held_out``); both keep its collate and loss."""
    held = sorted(set(held_out))
    held_set = set(held)
    rest = [i for i in range(len(data)) if i not in held_set]

    def part(indices: list[int]) -> TrainData:
        return TrainData(data.spec, examples=SubsetExamples(data, indices), loss=data.loss)

    return part(rest), part(held)


def batches_of(data: TrainData, batch_size: int, limit: int | None = None) -> list[Batch]:
    """``data`` in order as batches of ``batch_size`` (pre-batched data: its own batches), at most ``limit`` of them."""
    out: list[Batch] = []
    if data.map_style:
        for start in range(0, len(data), batch_size):
            if limit is not None and len(out) >= limit:
                break
            out.append(data.take(range(start, min(start + batch_size, len(data)))))
        return out
    for batch in data.iter_batches():
        if limit is not None and len(out) >= limit:
            break
        out.append(batch)
    return out
